"""RF-Inversion: controlled inversion towards a fixed noise, then controlled sampling towards the source.

Paper: Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic Differential
Equations", arXiv:2410.10792 (Algorithms 1 and 2, the controlled ODEs). Restated in the host's
sigma, with ``v(x, s, c) = (x - D(x, s, c)) / s`` the slope (flow: the velocity; EPS and
v-prediction: ``eps``), so it runs on every family.

Inversion, sigma rising from 0 with the source prompt: ``dY/ds = v + gamma (u1(Y, s) - v)``, where
``u1`` is the slope of the forward path from ``Y`` to a fixed, seeded noise ``y1``: flow
``(y1 - Y) / (1 - s)``, EPS ``y1``. Sampling, sigma falling with the target prompt:
``dX/ds = v + eta (u0(X, s) - v)`` on the steps ``start <= i < stop`` (else plain), where
``u0 = (X - x_src) / s`` is the slope of the path through ``X`` back to the source. Explicit Euler
steps, each slope at the step's start (at sigma 0, FlipSigmas' 1e-4: ``core.FLIPPED_ZERO``).
``gamma = 0`` is plain flow inversion (naive unsampling), ``eta = 0`` plain sampling. One model
call a step each way. A region (``mask``; None: the whole image) composites the result with the
source: outside it the source is kept exactly.
"""

from __future__ import annotations

import torch

from ..core import EPS, FLIPPED_ZERO, SolverError, check_finite, check_latent, check_schedule, notify, work_dtype
from .guidance import SOURCE, TARGET
from .masks import check_mask


def check_controls(gamma: float, eta: float, start: int, stop: int, steps: int) -> None:
    if not 0 <= gamma <= 1 or not 0 <= eta <= 1:
        raise SolverError(f"rf_inversion: gamma and eta must lie in [0, 1], got {gamma} and {eta}")
    if not 0 <= start <= stop <= steps:
        raise SolverError(f"rf_inversion: expected 0 <= start <= stop <= steps ({steps}), got {start} and {stop}")


def edit_rf_inversion(model, x_src, sigmas, w_src, w_tar, *, gamma=0.5, eta=0.9, start=0, stop=None, seed=0,
                      mask=None, space="eps", extra_args=None, callback=None):
    """Invert ``x_src`` up the reversed descending ``sigmas`` (ending at 0), then sample down them;
    returns (edited, edit-denoiser calls). ``model`` follows the edit contract (``guidance``)."""
    x_src = check_latent(x_src, "source latent").to(work_dtype(x_src.dtype))
    down = [float(v) for v in check_schedule(sigmas, x_src, descending=True)]
    if down[-1] != 0:
        raise SolverError(f"rf_inversion: the schedule must end at sigma 0, got {down[-1]:g}")
    steps = len(down) - 1
    stop = steps if stop is None else int(stop)
    check_controls(gamma, eta, int(start), stop, steps)
    if mask is not None and not callable(mask):
        mask = check_mask(mask, x_src).to(x_src)
    extra, calls = extra_args or {}, [0]

    def slope(x, s, branch, w):
        sig = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        out = model(x, sig, branch=branch, scale=w, **extra)
        calls[0] += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise SolverError(f"rf_inversion: the edit denoiser returned {getattr(out, 'shape', type(out))}, "
                              f"expected the latent's shape {tuple(x.shape)}")
        return (x - out.to(x.dtype)) / s

    y1 = torch.randn(x_src.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=x_src.dtype)
    y1 = y1.to(x_src.device)
    up, y = down[::-1], x_src
    for i in range(steps):
        s, t = up[i], up[i + 1]
        v = slope(y, max(s, FLIPPED_ZERO), SOURCE, float(w_src))
        u1 = y1 if space == EPS else (y1 - y) / (1 - s)
        y = check_finite(y + (t - s) * (v + gamma * (u1 - v)), "rf_inversion", i)
        notify(callback, i, y, t)
    x = y
    for i in range(steps):
        s, t = down[i], down[i + 1]
        v = slope(x, s, TARGET, float(w_tar))
        if start <= i < stop:
            v = v + eta * ((x - x_src) / s - v)
        x = check_finite(x + (t - s) * v, "rf_inversion", steps + i)
        notify(callback, steps + i, x, t)
    m = mask() if callable(mask) else mask
    return (x if m is None else x_src + m.to(x) * (x - x_src)), calls[0]
