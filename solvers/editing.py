"""Editing arithmetic: attention masks, per-pixel guidance, and the edit-friendly noise space.

Pure torch, in float32 or wider, on the device of the tensors given.

- Attention mask (prompt-to-prompt's local blend): for each cross-attention layer the
  probabilities ``softmax(q k^T / sqrt(d))`` of the edited tokens, summed over tokens and
  averaged over heads; 3x3 max-pooled at the layer's resolution, resized to the latent,
  averaged over layers and steps, divided by its maximum, then thresholded (``softness``
  widens the hard step into a linear ramp) and dilated.
- Blended guidance (AIDI): ``D = D_u + W (D_c - D_u)`` with ``W = w_inv + (w_edit - w_inv) M``;
  local blending takes the source branch's prediction outside the mask,
  ``D_t <- M D_t + (1 - M) D_s``, which for the linear samplers here keeps the target state
  equal to the source branch wherever ``M = 0``.
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
    """(downsampling factor, (h, w)) of a layer whose ``tokens`` queries tile ``image``-sized
    latents, or None where they do not form such a grid."""
    h, w = image
    f = max(1, round(math.sqrt(h * w / max(tokens, 1))))
    hh, ww = -(-h // f), -(-w // f)
    return (f, (hh, ww)) if hh * ww == tokens else None


def layer_map(att: torch.Tensor, hw: tuple, size: tuple) -> torch.Tensor:
    """One layer's (B, HW) attention as a (B, 1, *size) map: 3x3 max-pool, then resize."""
    m = att.view(att.shape[0], 1, *hw)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def shape_mask(raw: torch.Tensor, threshold: float, softness: float, dilation: int) -> torch.Tensor:
    """Normalise a (B, 1, h, w) map by its maximum, threshold it and dilate it (in latent pixels)."""
    m = raw / raw.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    if softness > 0:
        m = ((m - threshold) / softness + 0.5).clamp(0, 1)
    else:
        m = (m > threshold).to(raw.dtype)
    if dilation > 0:
        m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
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
    """A (B or 1, H, W) mask in [0, 1] as (batch, 1, *size) by area averaging."""
    m = mask.to(torch.float32).unsqueeze(1)
    m = F.interpolate(m, size=size, mode="area") if tuple(m.shape[-2:]) != tuple(size) else m
    return m.expand(batch, -1, -1, -1) if m.shape[0] == 1 else m


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
    src = source.to(edits).repeat(reps, *[1] * (edits.ndim - 1))
    keep = (1 - mask.to(edits)).repeat(reps, *[1] * (edits.ndim - 1)).expand_as(edits)
    weight = keep.flatten(1).sum(1)
    mse = (keep * (edits - src) ** 2).flatten(1).sum(1) / weight.clamp_min(1e-12)
    peak = (source.amax() - source.amin()).to(edits) ** 2
    return torch.where(weight > 0, 10 * torch.log10(peak / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))
