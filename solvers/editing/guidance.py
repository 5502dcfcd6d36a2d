"""Blended guidance over two prompt branches: the edit denoiser contract and its arithmetic.

The edit denoiser contract extends the solvers' one with a branch and a scale:
``model(x, sigma, branch="source" | "target", scale=w, **extra_args) -> Prediction``. With a
number ``w`` the model guides by its own arithmetic, ``Prediction.guided = D_u + w (D_c - D_u)``
with ``D_c`` conditioned on that branch's prompt (so a scalar scale is plain guided sampling
bit for bit); with ``scale=None`` it returns both halves, ``uncond`` and ``cond``, and
``Prediction.mix(W)`` guides them at a per-pixel scale the editor builds. Each prediction also
carries the edited words' attention of that call (``maps``: ((factor, map), ...); empty where
no words are edited), from which the editor builds the region's mask after the call
(``Edit``). ``TwoPrompts`` builds one from a guided denoiser ``model(x, sigma, cfg=w,
**extra)``; the host's guider implements it in ``nodes/host``.

Blended guidance (AIDI): ``D = D_u + W (D_c - D_u)`` with ``W = w_inv + (w_edit - w_inv) M``
while the mask's window is open, ``w_inv`` after; local blending takes the source branch's
prediction outside the mask, ``D_t <- M D_t + (1 - M) D_s``, which for the per-pixel linear
samplers here keeps the target state equal to the source branch wherever ``M = 0``.
"""

from __future__ import annotations

import math

import torch

from ..core import SolverError, work_dtype
from .attention import Maps
from .masks import Region, opened

SOURCE, TARGET = "source", "target"


class Prediction:
    """One branch's evaluation at one step: ``guided`` at the number asked for as scale, or, with
    none asked, the halves ``uncond`` and ``cond``; ``maps``: the edited words' attention in the call."""

    def __init__(self, guided=None, uncond=None, cond=None, maps=()):
        self.guided, self.uncond, self.cond, self.maps = guided, uncond, cond, tuple(maps)

    def mix(self, w: torch.Tensor) -> torch.Tensor:
        """``D_u + W (D_c - D_u)`` at the per-pixel scale ``W``, in float32 or wider whatever the
        halves' dtype (a half-precision model's halves would round the difference and the scaled sum)."""
        dt = work_dtype(torch.promote_types(self.uncond.dtype, w.dtype))
        u = self.uncond.to(dt)
        return u + w.to(u) * (self.cond.to(u) - u)


class TwoPrompts:
    """An edit denoiser from a guided one, ``model(x, sigma, cfg=w, **extra) -> x0_hat``.

    ``source`` and ``target`` are the extra arguments of each prompt (e.g. ``{"label": 3}``);
    cfg 0 must be the unconditional prediction and 1 the conditional one. A scalar scale
    is one guided call (the model's own arithmetic, so it equals plain guided sampling bit
    for bit); without one it calls both halves. It reads no attention.
    """

    def __init__(self, model, source: dict, target: dict):
        self.model, self.extra = model, {SOURCE: source, TARGET: target}

    def __call__(self, x, sigma, branch=SOURCE, scale=1.0):
        extra = self.extra[branch]
        if scale is not None:
            return Prediction(self.model(x, sigma, cfg=float(scale), **extra))
        u = self.model(x, sigma, cfg=0.0, **extra)
        return Prediction(uncond=u, cond=self.model(x, sigma, cfg=1.0, **extra))


def per_pixel_scale(w_inv: float, w_edit: float, mask):
    return w_inv + (w_edit - w_inv) * mask


def local_blend(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return target * mask + source * (1 - mask)


def composite(source: torch.Tensor, edited: torch.Tensor, mask) -> torch.Tensor:
    """``source + M (edited - source)``, exact at M = 0 and M = 1 (``torch.lerp``); None: the edit."""
    return edited if mask is None else torch.lerp(source, edited, mask.to(edited).expand_as(edited))


def uniform(mask):
    """The mask's one value where it has one (1.0 for None, the whole image), else None."""
    if mask is None:
        return 1.0
    lo, hi = float(mask.min()), float(mask.max())
    return lo if lo == hi else None


def check_scales(w_inv: float, w_edit: float):
    for name, w in (("w_inv", w_inv), ("w_edit", w_edit)):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SolverError(f"{name} must be a finite guidance scale >= 0, got {w!r}")


class Edit:
    """An edit's model calls and its region.

    ``call`` evaluates one branch (counted, its shape checked) and keeps the attention it
    returns; ``mask(step, steps)``, read after a step's calls, is the region's mask at that step
    of its window (``masks.Region``: from the fixed mask and the attention read so far), and
    ``shown`` the region's values it came from (None: the whole image). ``known`` is the mask
    before the step's calls where it does not wait for them (no edited words).
    """

    def __init__(self, model, region: Region, like: torch.Tensor, extra_args=None, name: str = ""):
        self.model, self.region, self.like = model, region, like
        self.extra, self.name = extra_args or {}, name
        self.maps, self.nfe = Maps(), 0
        self.fixed = None if region.words else region.soft(None, like)
        self.shown = self.fixed

    def call(self, x, sigma, branch: str, scale=None) -> Prediction:
        out = self.model(x, _sig(sigma, x), branch=branch, scale=scale, **self.extra)
        self.nfe += 1
        parts = () if not isinstance(out, Prediction) else (out.guided,) if scale is not None else (out.uncond, out.cond)
        if not parts or any(not isinstance(t, torch.Tensor) or t.shape != x.shape for t in parts):
            got = [tuple(getattr(t, "shape", ())) for t in parts] if parts else type(out).__name__
            raise SolverError(f"{self.name}the edit denoiser returned {got} for the {branch} branch, expected a "
                              f"Prediction of the latent's shape {tuple(x.shape)}")
        self.maps.add(branch, out.maps)
        if scale is not None:
            return Prediction(out.guided.to(x.dtype), maps=out.maps)
        return out

    def soft(self):
        if not self.region.words:
            return self.fixed
        self.shown = self.region.soft(self.maps.raw(self.like.shape[0]), self.like)
        return self.shown

    def mask(self, step: int, steps: int):
        return self.region.at(self.soft(), step, steps)

    def known(self, step: int, steps: int):
        """(whether the step's mask is known before its calls, that mask)."""
        if self.region.words:
            return False, None
        return True, self.region.at(self.fixed, step, steps)


class Branches(Edit):
    """Blended guidance of a source and a target branch, one step at a time.

    ``pair(xs, xt, sigma)`` evaluates the source branch at ``w_inv`` (when ``xs`` is given) and
    the target branch at ``W = w_inv + (w_edit - w_inv) M`` during the mask's window (the first
    ``ceil(mask_steps * N)`` steps of the descending ``sigmas``), ``w_inv`` after; with
    ``local_blend`` the target's prediction takes the source's outside the mask in the window.
    ``M`` is the region's mask at the step (``Edit.mask``, after the step's calls: attention
    read in this very step shapes it); the step is the one whose sigma is nearest. A uniform
    mask known before the calls gives a scalar scale, so an all-zero mask without blending is
    plain guided sampling. ``nfe`` counts branch evaluations.
    """

    def __init__(self, model, region: Region, like: torch.Tensor, w_inv: float, w_edit: float, sigmas,
                 mask_steps: float = 1.0, local_blend: bool = True, extra_args=None):
        check_scales(w_inv, w_edit)
        super().__init__(model, region, like, extra_args)
        s = [float(v) for v in sigmas]
        self.open, self.steps = opened(s, mask_steps), len(s) - 1
        self.mids = [0.5 * (a + b) for a, b in zip(s, s[1:])]  # a model may see sigma rounded to its dtype
        self.w_inv, self.w_edit, self.blend = float(w_inv), float(w_edit), local_blend

    def step_of(self, sigma) -> int:
        v = float(torch.as_tensor(sigma).flatten()[0])
        return min(sum(1 for m in self.mids if m > v), self.steps - 1)

    def target(self, xt, sigma, k: int):
        """(D_t before blending, the mask of step ``k``: None outside the window or for the whole image)."""
        if k >= self.open:  # the region is not used, but shown as the attention makes it
            dt = self.call(xt, sigma, TARGET, self.w_inv).guided
            self.soft()
            return dt, None
        scale = self.w_inv
        if self.w_edit != self.w_inv:
            known, m = self.known(k, self.open)
            u = uniform(m) if known else None
            scale = None if u is None else per_pixel_scale(self.w_inv, self.w_edit, u)
        p = self.call(xt, sigma, TARGET, scale)
        m = self.mask(k, self.open)
        if scale is not None:
            return p.guided, m
        return p.mix(per_pixel_scale(self.w_inv, self.w_edit, m)).to(xt.dtype), m

    def pair(self, xs, xt, sigma, step=None):
        """(D_s or None, D_t) at ``sigma`` (a float or a per-item tensor), at step ``step`` of the
        schedule (None: the step of ``sigma``)."""
        k = self.step_of(sigma) if step is None else step
        ds = None if xs is None else self.call(xs, sigma, SOURCE, self.w_inv).guided
        dt, m = self.target(xt, sigma, k)
        if m is not None and self.blend and ds is not None and uniform(m) != 1.0:
            dt = local_blend(ds, dt, m.to(dt))
        return ds, dt

    def stacked(self, x, sigma):
        """The pair as one denoiser over the batch ``[source; target]``, for any sampler."""
        xs, xt = x.chunk(2)
        ds, dt = self.pair(xs, xt, sigma)
        return torch.cat([ds, dt])


def _sig(sigma, x):
    if isinstance(sigma, (int, float)):
        return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    return s[: x.shape[0]] if s.numel() >= x.shape[0] else s.expand(x.shape[0])
