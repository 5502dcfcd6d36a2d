"""Ancestral steps and their noise, for the edit-friendly (stochastic) editor.

An ancestral step is ``x_a = mu(x_b) + s z``; from a trajectory ``x*`` the offsets
``e_i = x*_{i-1} - mu(x*_i)`` make the replay reproduce it exactly, and ``z_i = e_i / s_i``
is the noise a fresh seeded draw may replace.
"""

from __future__ import annotations

import math

import torch

from ..core import EPS, SolverError


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
