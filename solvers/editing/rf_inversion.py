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
source: outside it the source is kept exactly. A growing region (``masks.Region.grow``) grows
over the sampling steps: after each, the pixels not yet edited take the inversion's state at
that sigma (as inpainting takes the noised source), so they end at the source exactly; this
keeps the inversion's states (one latent a step).
"""

from __future__ import annotations

import torch

from ..core import (EPS, FLIPPED_ZERO, SolverError, check_finite, check_latent, check_schedule, notify,
                    work_dtype)
from .guidance import SOURCE, TARGET, Edit, composite
from .masks import region


def check_controls(gamma: float, eta: float, start: int, stop: int, steps: int) -> None:
    if not 0 <= gamma <= 1 or not 0 <= eta <= 1:
        raise SolverError(f"rf_inversion: gamma and eta must lie in [0, 1], got {gamma} and {eta}")
    if not 0 <= start <= stop <= steps:
        raise SolverError(f"rf_inversion: expected 0 <= start <= stop <= steps ({steps}), got {start} and {stop}")


GAMMA, ETA = 0.5, 0.9  # the controllers' strengths by default, here and on the node


def edit_rf_inversion(model, x_src, sigmas, w_src, w_tar, *, gamma=GAMMA, eta=ETA, start=0, stop=None, seed=0,
                      mask=None, space="eps", extra_args=None, callback=None):
    """Invert ``x_src`` up the reversed descending ``sigmas`` (ending at 0), then sample down them;
    returns (edited, edit-denoiser calls). ``model`` follows the edit contract (``guidance``);
    ``mask``: as ``edit_flowedit`` takes it."""
    x_src = check_latent(x_src, "source latent").to(work_dtype(x_src.dtype))
    down = [float(v) for v in check_schedule(sigmas, x_src, descending=True)]
    if down[-1] != 0:
        raise SolverError(f"rf_inversion: the schedule must end at sigma 0, got {down[-1]:g}")
    steps = len(down) - 1
    stop = steps if stop is None else int(stop)
    check_controls(gamma, eta, int(start), stop, steps)
    edit = Edit(model, region(mask, x_src), x_src, extra_args, "rf_inversion: ")
    grow = edit.region.grow

    def slope(x, s, branch, w):
        return (x - edit.call(x, s, branch, w).guided) / s

    y1 = torch.randn(x_src.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=x_src.dtype)
    y1 = y1.to(x_src.device)
    up, y = down[::-1], x_src
    states = [y] if grow else None
    for i in range(steps):
        s, t = up[i], up[i + 1]
        v = slope(y, max(s, FLIPPED_ZERO), SOURCE, float(w_src))
        u1 = y1 if space == EPS else (y1 - y) / (1 - s)
        y = check_finite(y + (t - s) * (v + gamma * (u1 - v)), "rf_inversion", i)
        if grow:
            states.append(y)
        notify(callback, i, y, t, mask=edit.shown)
    x = y
    for i in range(steps):
        s, t = down[i], down[i + 1]
        v = slope(x, s, TARGET, float(w_tar))
        if start <= i < stop:
            v = v + eta * ((x - x_src) / s - v)
        x = check_finite(x + (t - s) * v, "rf_inversion", steps + i)
        m = edit.mask(i, steps)  # after the step's call: the attention it read counts
        if grow:
            x = composite(states[steps - 1 - i], x, m)
        notify(callback, steps + i, x, t, mask=edit.shown)
    return (x if grow or not steps else composite(x_src, x, m)), edit.nfe
