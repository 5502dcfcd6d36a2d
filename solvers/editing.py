"""Editing arithmetic and the two-branch denoiser every editing method calls.

Pure torch, in float32 or wider, on the device of the tensors given.

The edit denoiser contract extends the solvers' one with a branch and a scale:
``model(x, sigma, branch="source" | "target", scale=w, **extra_args) -> x0_hat`` returns
``D_u + w (D_c - D_u)`` with ``D_c`` conditioned on that branch's prompt. ``w`` is a float,
a tensor broadcastable to ``x`` (a per-pixel scale), or a callable returning either,
called once the conditional prediction exists (so a mask read from this very call's
attention can shape its own scale). ``TwoPrompts`` builds one from a guided denoiser
``model(x, sigma, cfg=w, **extra)``; the host's guider implements it in ``nodes/``.

- Attention mask (prompt-to-prompt's local blend): for each cross-attention layer the
  probabilities ``softmax(q k^T / sqrt(d))`` of the edited tokens, summed over tokens and
  averaged over heads; 3x3 max-pooled at the layer's resolution, resized to the latent,
  averaged over layers and steps, divided by its maximum, then thresholded (``softness``
  widens the hard step into a linear ramp) and dilated.
- Blended guidance (AIDI): ``D = D_u + W (D_c - D_u)`` with ``W = w_inv + (w_edit - w_inv) M``
  while the mask's window is open (the first ``ceil(mask_steps * N)`` sampling steps),
  ``w_inv`` after; local blending takes the source branch's prediction outside the mask,
  ``D_t <- M D_t + (1 - M) D_s``, which for the per-pixel linear samplers here keeps the
  target state equal to the source branch wherever ``M = 0`` (``Branches``).
- Edit-friendly noise: an ancestral step ``x_a = mu(x_b) + s z``; from a trajectory ``x*``
  the offsets ``e_i = x*_{i-1} - mu(x*_i)`` make the replay reproduce it exactly, and
  ``z_i = e_i / s_i`` is the noise a fresh seeded draw may replace.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import EPS, SolverError, work_dtype


def token_attention(q, k, heads: int, tokens) -> torch.Tensor:
    """(B, HW) attention of the queries on ``tokens``, summed over tokens, mean over heads."""
    b, n, inner = q.shape
    d = inner // heads
    dt = work_dtype(q.dtype)
    qh = q.to(dt).view(b, n, heads, d).transpose(1, 2)
    kh = k.to(dt).view(b, k.shape[1], heads, d).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return probs[..., list(tokens)].sum(-1).mean(1)


def joint_token_attention(q, k, text: int, tokens, chunk: int = 1024) -> torch.Tensor:
    """(B, N) attention of the image queries of a joint [context, image] attention on ``tokens``.

    ``q``, ``k``: (B, heads, text + N, d). The softmax runs over every key, as the model's;
    queries go in chunks so the probabilities never exceed (B, heads, chunk, L).
    """
    dt = work_dtype(q.dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    kt = k.to(dt).transpose(-1, -2)
    cols = list(tokens)
    parts = []
    for i in range(text, q.shape[2], chunk):
        probs = torch.softmax(q[:, :, i:i + chunk].to(dt) @ kt * scale, dim=-1)
        parts.append(probs[..., cols].sum(-1).mean(1))
    return torch.cat(parts, 1)


def layer_grid(tokens: int, image: tuple):
    """(downsampling factor, grid) of a layer whose ``tokens`` queries tile ``image``-sized
    latents ((h, w), or (T, h, w) for video with every latent frame kept), or None where
    they do not form such a grid."""
    frames = image[0] if len(image) == 3 else 1
    h, w = image[-2:]
    if tokens % frames:
        return None
    per = tokens // frames
    f = max(1, round(math.sqrt(h * w / max(per, 1))))
    hh, ww = -(-h // f), -(-w // f)
    if hh * ww != per:
        return None
    return (f, (frames, hh, ww) if len(image) == 3 else (hh, ww))


def layer_map(att: torch.Tensor, grid: tuple, size: tuple) -> torch.Tensor:
    """One layer's (B, N) attention as a (B, 1, *size) map: 3x3 max-pool per frame, then resize."""
    m = att.view(att.shape[0], 1, *grid)
    if len(grid) == 3:
        m = F.max_pool3d(m, (1, 3, 3), stride=1, padding=(0, 1, 1))
        return F.interpolate(m, size=tuple(size), mode="trilinear", align_corners=False)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)


def shape_mask(raw: torch.Tensor, threshold: float, softness: float, dilation: int) -> torch.Tensor:
    """Normalise a (B, 1, *spatial) map by its maximum, threshold it and dilate it (in latent
    pixels, within each frame)."""
    m = raw / raw.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (raw.ndim - 1))
    if softness > 0:
        m = ((m - threshold) / softness + 0.5).clamp(0, 1)
    else:
        m = (m > threshold).to(raw.dtype)
    if dilation > 0:
        k = 2 * dilation + 1
        m = F.max_pool2d(m, k, stride=1, padding=dilation) if m.ndim == 4 else \
            F.max_pool3d(m, (1, k, k), stride=1, padding=(0, dilation, dilation))
    return m


def combine_masks(a, b, mode: str):
    """Combine an attention mask ``a`` with a user mask ``b`` (either may be None)."""
    if a is None or mode == "replace":
        return b
    if b is None:
        return a
    if mode == "union":
        return torch.maximum(a, b)
    if mode == "intersect":
        return torch.minimum(a, b)
    raise SolverError(f"mask mode must be replace, union or intersect, got {mode!r}")


def resize_mask(mask: torch.Tensor, size: tuple, batch: int) -> torch.Tensor:
    """A (B or 1, *dims) mask in [0, 1] as (batch, 1, *size) by area averaging (2 or 3 dims)."""
    m = mask.to(torch.float32).unsqueeze(1)
    m = F.interpolate(m, size=tuple(size), mode="area") if tuple(m.shape[2:]) != tuple(size) else m
    return m.expand(batch, *[-1] * (m.ndim - 1)) if m.shape[0] == 1 else m


def per_pixel_scale(w_inv: float, w_edit: float, mask: torch.Tensor) -> torch.Tensor:
    return w_inv + (w_edit - w_inv) * mask


def local_blend(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return target * mask + source * (1 - mask)


def ancestral(sb: float, sa: float, eta: float, space: str):
    """Coefficients of ``x_a = c * (x_b + (s_down - sb) d(x_b, sb)) + s_up * z``.

    EPS: k-diffusion's ancestral split ``s_up = min(sa, eta sqrt(sa^2 (sb^2 - sa^2) / sb^2))``,
    ``s_down = sqrt(sa^2 - s_up^2)``, ``c = 1``. Flow: step to ``s_down = sa (1 + (sa/sb - 1) eta)``,
    rescale by ``c = (1 - sa) / (1 - s_down)`` and renoise with
    ``s_up = sqrt(sa^2 - s_down^2 c^2)``. ``eta = 0`` is the deterministic Euler step.
    """
    if sa == 0 or eta == 0:
        return sa, 1.0, 0.0
    if space == EPS:
        up = min(sa, eta * math.sqrt(sa ** 2 * (sb ** 2 - sa ** 2) / sb ** 2))
        return math.sqrt(sa ** 2 - up ** 2), 1.0, up
    down = sa * (1 + (sa / sb - 1) * eta)
    c = (1 - sa) / (1 - down)
    return down, c, math.sqrt(max(sa ** 2 - down ** 2 * c ** 2, 0.0))


def ancestral_mean(x, denoised, sb: float, sa: float, eta: float, space: str):
    """``mu(x_b)``, the deterministic part of the ancestral step, and its noise scale."""
    down, c, up = ancestral(sb, sa, eta, space)
    return c * (x + (down - sb) * (x - denoised) / sb), up


def check_eta(eta: float):
    if not 0 <= eta <= 1:
        raise SolverError(f"eta must be in [0, 1], got {eta}")


def preservation(edits: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per edit, PSNR (dB) against the source outside the mask (data range: the source's).

    ``edits`` may hold several copies of the source batch; inf where nothing lies outside.
    """
    reps = edits.shape[0] // source.shape[0]
    ones = [1] * (edits.ndim - 1)
    src = source.to(edits).repeat(reps, *ones)
    keep = (1 - mask.to(edits)).expand(source.shape[0], *mask.shape[1:]).repeat(reps, *ones).expand_as(edits)
    weight = keep.flatten(1).sum(1)
    mse = (keep * (edits - src) ** 2).flatten(1).sum(1) / weight.clamp_min(1e-12)
    peak = (source.amax() - source.amin()).to(edits) ** 2
    return torch.where(weight > 0, 10 * torch.log10(peak / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))


# -- the two-branch denoiser ---------------------------------------------------------------

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


def window(sigmas, mask_steps: float) -> float:
    """The sigma above which the mask is active: the first ``ceil(mask_steps * N)`` steps of
    the descending schedule ``sigmas``. The cut lies halfway between two schedule sigmas, so
    a model that sees sigma rounded to its own dtype falls on the same side."""
    if not 0 <= mask_steps <= 1:
        raise SolverError(f"mask_steps must be in [0, 1], got {mask_steps}")
    s = [float(v) for v in sigmas]
    n = len(s) - 1
    active = math.ceil(mask_steps * n - 1e-9)
    if active <= 0:
        return math.inf
    if active >= n:
        return -math.inf
    return 0.5 * (s[active - 1] + s[active])


def check_scales(w_inv: float, w_edit: float):
    for name, w in (("w_inv", w_inv), ("w_edit", w_edit)):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SolverError(f"{name} must be a finite guidance scale >= 0, got {w!r}")


def check_mask(mask, x: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A mask in [0, 1] broadcastable to ``x`` with one channel: (B or 1, 1, *x's spatial shape)."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        raise SolverError(f"{name} must be a floating-point tensor, got {type(mask).__name__}")
    ok = mask.ndim == x.ndim and mask.shape[1] == 1 and mask.shape[0] in (1, x.shape[0]) and \
        all(m in (1, d) for m, d in zip(mask.shape[2:], x.shape[2:]))
    if not ok:
        raise SolverError(f"{name} has shape {tuple(mask.shape)}; expected (1 or {x.shape[0]}, 1, "
                          f"{', '.join(str(d) for d in x.shape[2:])}) for a latent of shape {tuple(x.shape)}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise SolverError(f"{name} values must lie in [0, 1], got [{float(mask.min()):g}, {float(mask.max()):g}]")
    return mask


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


def frames(mask: torch.Tensor, latent_frames: int, factor: int) -> torch.Tensor:
    """A (F, H, W) mask over video frames as (T, H, W) over latent frames.

    The first latent frame holds the first frame alone and each later one ``factor`` frames
    (Wan: 4), so ``F = 1 + (T - 1) * factor``; each latent frame takes the mean of its
    frames. One frame applies to every latent frame; ``F = T`` is taken as already per latent
    frame.
    """
    f = mask.shape[0]
    if f == 1:
        return mask.expand(latent_frames, *mask.shape[1:])
    if f == latent_frames:
        return mask
    if f != 1 + (latent_frames - 1) * factor:
        raise SolverError(f"the mask has {f} frames; the latent's {latent_frames} frames come from "
                          f"{1 + (latent_frames - 1) * factor} (1 + {latent_frames - 1} x {factor}); give 1, "
                          f"{latent_frames} or {1 + (latent_frames - 1) * factor} frames")
    rest = mask[1:].reshape(latent_frames - 1, factor, *mask.shape[1:]).mean(1)
    return torch.cat([mask[:1], rest])
