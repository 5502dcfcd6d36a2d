"""Blended guidance over two prompt branches: the edit denoiser contract and its arithmetic.

The edit denoiser contract extends the solvers' one with a branch and a scale:
``model(x, sigma, branch="source" | "target", scale=w, **extra_args) -> x0_hat`` returns
``D_u + w (D_c - D_u)`` with ``D_c`` conditioned on that branch's prompt. ``w`` is a float,
a tensor broadcastable to ``x`` (a per-pixel scale), or a callable returning either,
called once the conditional prediction exists (so a mask read from this very call's
attention can shape its own scale). ``TwoPrompts`` builds one from a guided denoiser
``model(x, sigma, cfg=w, **extra)``; the host's guider implements it in ``nodes/host``.

Blended guidance (AIDI): ``D = D_u + W (D_c - D_u)`` with ``W = w_inv + (w_edit - w_inv) M``
while the mask's window is open, ``w_inv`` after; local blending takes the source branch's
prediction outside the mask, ``D_t <- M D_t + (1 - M) D_s``, which for the per-pixel linear
samplers here keeps the target state equal to the source branch wherever ``M = 0``.
"""

from __future__ import annotations

import math

import torch

from ..core import SolverError

SOURCE, TARGET = "source", "target"


class TwoPrompts:
    """An edit denoiser from a guided one, ``model(x, sigma, cfg=w, **extra) -> x0_hat``.

    ``source`` and ``target`` are the extra arguments of each prompt (e.g. ``{"label": 3}``);
    cfg 0 must be the unconditional prediction and 1 the conditional one. A scalar scale
    is one guided call (the model's own arithmetic, so it equals plain guided sampling bit
    for bit); a per-pixel scale calls both halves and mixes them here.
    """

    def __init__(self, model, source: dict, target: dict):
        self.model, self.extra = model, {SOURCE: source, TARGET: target}

    def __call__(self, x, sigma, branch=SOURCE, scale=1.0):
        extra = self.extra[branch]
        if not callable(scale) and not isinstance(scale, torch.Tensor):
            return self.model(x, sigma, cfg=float(scale), **extra)
        u = self.model(x, sigma, cfg=0.0, **extra)
        c = self.model(x, sigma, cfg=1.0, **extra)
        w = scale() if callable(scale) else scale
        return u + w.to(u) * (c - u) if isinstance(w, torch.Tensor) else u + float(w) * (c - u)


def per_pixel_scale(w_inv: float, w_edit: float, mask: torch.Tensor) -> torch.Tensor:
    return w_inv + (w_edit - w_inv) * mask


def local_blend(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return target * mask + source * (1 - mask)


def check_scales(w_inv: float, w_edit: float):
    for name, w in (("w_inv", w_inv), ("w_edit", w_edit)):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SolverError(f"{name} must be a finite guidance scale >= 0, got {w!r}")


class Branches:
    """Blended guidance of a source and a target branch, one step at a time.

    ``pair(xs, xt, sigma)`` evaluates the source branch at ``w_inv`` (when ``xs`` is given) and
    the target branch at ``W = w_inv + (w_edit - w_inv) M`` while ``sigma > cut`` (the mask's
    window, from ``window``), ``w_inv`` after; with ``local_blend`` the target's prediction
    takes the source's outside the mask in the window. ``mask`` is a (B or 1, 1, ...) tensor in
    [0, 1], or a callable returning one (the host's attention mask, which grows as the
    model is evaluated); it is read after the calls of the step. A uniform tensor mask
    gives a scalar scale, so an all-zero mask without blending is plain guided sampling.
    ``nfe`` counts branch evaluations.
    """

    def __init__(self, model, mask, w_inv: float, w_edit: float, cut: float = -math.inf, local_blend: bool = True,
                 extra_args=None):
        check_scales(w_inv, w_edit)
        self.model, self.mask, self.cut = model, mask, cut
        self.w_inv, self.w_edit, self.blend = float(w_inv), float(w_edit), local_blend
        self.extra = extra_args or {}
        self.nfe = 0
        self.uniform = None
        if isinstance(mask, torch.Tensor):
            lo, hi = float(mask.min()), float(mask.max())
            self.uniform = lo if lo == hi else None

    def current(self, like=None):
        m = self.mask() if callable(self.mask) else self.mask
        return m if like is None else m.to(like)

    def on(self, sigma) -> bool:
        return float(torch.as_tensor(sigma).flatten()[0]) > self.cut

    def scale(self, on: bool):
        if not on or self.w_edit == self.w_inv:
            return self.w_inv
        if self.uniform is not None:
            return per_pixel_scale(self.w_inv, self.w_edit, self.uniform)
        return lambda: per_pixel_scale(self.w_inv, self.w_edit, self.current())

    def call(self, x, sigma, branch, scale):
        out = self.model(x, sigma, branch=branch, scale=scale, **self.extra)
        self.nfe += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise SolverError(f"the edit denoiser returned {getattr(out, 'shape', type(out))} for the {branch} "
                              f"branch, expected the latent's shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def pair(self, xs, xt, sigma):
        """(D_s or None, D_t) at ``sigma`` (a float or a per-item tensor)."""
        on = self.on(sigma)
        ds = None if xs is None else self.call(xs, _sig(sigma, xs), SOURCE, self.w_inv)
        dt = self.call(xt, _sig(sigma, xt), TARGET, self.scale(on))
        if on and self.blend and ds is not None and self.uniform != 1.0:
            dt = local_blend(ds, dt, self.current(dt))
        return ds, dt

    def stacked(self, x, sigma):
        """The pair as one denoiser over the batch ``[source; target]``, for any sampler."""
        xs, xt = x.chunk(2)
        ds, dt = self.pair(xs, xt, sigma)
        return torch.cat([ds, dt])


def _sig(sigma, x):
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    return s[: x.shape[0]] if s.numel() >= x.shape[0] else s.expand(x.shape[0])
