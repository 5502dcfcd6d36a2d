"""The edit region: masks in [0, 1] over the latent, their shaping, combining and checks.

A mask is (B or 1, 1, *spatial) where the latent is (B, C, *spatial); spatial is (H, W), or
(T, H, W) for video. The region's window in time is ``opened``: the first
``ceil(mask_steps * N)`` sampling steps.

``Region`` is what an editor is given: a fixed mask, the edited words' attention (read from the
model's calls as the edit runs, ``attention.Maps``), or both, and how to soften its edge
(``feather``) and whether it grows step by step (``grown``, DifferentialDiffusion's rule).
The editors build the mask of each step from it themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import SolverError, work_dtype

MODES = ("replace", "union", "intersect")  # how a fixed mask meets the words' attention


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
    raise SolverError(f"mask mode must be one of {', '.join(MODES)}, got {mode!r}")


def resize_mask(mask: torch.Tensor, size: tuple, batch: int) -> torch.Tensor:
    """A (B or 1, *dims) mask in [0, 1] as (batch, 1, *size) by area averaging (2 or 3 dims)."""
    m = mask.to(torch.float32).unsqueeze(1)
    m = F.interpolate(m, size=tuple(size), mode="area") if tuple(m.shape[2:]) != tuple(size) else m
    return m.expand(batch, *[-1] * (m.ndim - 1)) if m.shape[0] == 1 else m


def per_latent_frame(mask: torch.Tensor, latent_frames: int, factor: int) -> torch.Tensor:
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


def opened(sigmas, mask_steps: float) -> int:
    """How many steps of the descending ``sigmas`` the mask's window holds: ``ceil(mask_steps * N)``."""
    if not 0 <= mask_steps <= 1:
        raise SolverError(f"mask_steps must be in [0, 1], got {mask_steps}")
    return max(0, math.ceil(mask_steps * (len(sigmas) - 1) - 1e-9))


def feather(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The mask times an inward ramp of ``width`` latent pixels: a pixel at chessboard distance d
    from the nearest pixel outside the region (mask 0; the latent's border is not outside) keeps
    ``min(d, width + 1) / (width + 1)`` of its value. Outside stays exactly 0; width 0 is the mask."""
    mask = mask.to(work_dtype(mask.dtype))  # a half-precision mask would round the ramp's fractions
    if width <= 0:
        return mask
    inside = (mask > 0).to(mask.dtype)
    ramp, ring = inside, inside
    for _ in range(int(width)):  # erosion by one pixel a pass; max-pooling's padding is ignored
        ring = -F.max_pool2d(-ring, 3, stride=1, padding=1) if ring.ndim == 4 else \
            -F.max_pool3d(-ring, (1, 3, 3), stride=1, padding=(0, 1, 1))
        ramp = ramp + ring
    return mask * (ramp / (width + 1))


def grown(mask: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """DifferentialDiffusion's rule: at ``step`` (from 0) of a window of ``steps``, the pixels whose
    value reaches the threshold ``1 - step / steps`` are edited (1), the others not (0). A value of 1
    is edited at every step, 0 at none, v from the first step whose threshold is at most v."""
    mask = mask.to(work_dtype(mask.dtype))  # in half precision the threshold itself would be rounded
    return (mask >= 1 - step / steps).to(mask.dtype)


@dataclass(frozen=True)
class Region:
    """An edit region as an editor takes it.

    ``mask``: a fixed mask (B or 1, 1, *spatial) or None; ``words``: whether the edited words'
    attention, read from the model's calls, shapes it too (``shape_mask`` with ``threshold``,
    ``softness``, ``dilation``, combined with ``mask`` by ``mode``; before any attention is read it
    is ``mask``, or 0). Neither: the whole image. ``feather``: an inward ramp of that many latent
    pixels (``feather``); ``grow``: at each step of the region's window only the pixels whose
    value reaches a threshold falling from 1 towards 0 (``grown``), else the values per pixel.
    """
    mask: torch.Tensor | None = None
    words: bool = False
    mode: str = "union"
    threshold: float = 0.3
    softness: float = 0.0
    dilation: int = 1
    feather: int = 0
    grow: bool = False

    def check(self, x: torch.Tensor) -> "Region":
        if self.mode not in MODES:
            raise SolverError(f"mask mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.feather, int) or self.feather < 0:
            raise SolverError(f"feather must be a whole number of latent pixels >= 0, got {self.feather!r}")
        if self.mask is not None:
            check_mask(self.mask, x)
        return self

    def soft(self, raw, like: torch.Tensor):
        """The region's values from the attention ``raw`` read so far (None: none yet), feathered;
        None for the whole image."""
        att = None if raw is None else shape_mask(raw.to(work_dtype(raw.dtype)), self.threshold, self.softness,
                                                  self.dilation)
        user = None if self.mask is None else \
            self.mask.to(like.device if raw is None else raw.device, work_dtype(self.mask.dtype))
        m = combine_masks(att, user, self.mode)
        if m is None:
            if not self.words:
                return None
            m = torch.zeros(1, 1, *like.shape[2:], device=like.device)
        return feather(m, self.feather)

    def at(self, soft, step: int, steps: int):
        """The mask of ``step`` of the window's ``steps``, from the region's values ``soft``."""
        return soft if soft is None or not self.grow else grown(soft, step, steps)


def region(mask, x: torch.Tensor) -> Region:
    """An editor's ``mask`` argument as a checked ``Region``: a ``Region``, a tensor, or None (the whole image)."""
    if isinstance(mask, Region):
        return mask.check(x)
    return Region() if mask is None else Region(check_mask(mask, x))
