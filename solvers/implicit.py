"""The exact inverse of one Euler/DDIM step, found as a fixed point.

Sampling steps from ``sb`` down to ``sa`` with ``x_a = x_b + (sa - sb) d(x_b, sb)``. Its
inverse is the ``x_b`` with ``x_b = F(x_b)``, ``F(x) = x_a + (sb - sa) d(x, sb)``; ``F``
never divides by ``sa``, so the first step out of sigma = 0 is well defined. The methods
differ only in how the next iterate is chosen from the history of pairs ``(x_j, F(x_j))``
(``update``), and in where the iteration starts (``guess``):

- ``ddim``: the DDIM guess point ``x_a * sqrt(1 + sb^2) / sqrt(1 + sa^2)`` (flow: ``x_a``),
  whose first ``F`` value is exactly the DDIM inversion step;
- ``extrapolate``: ``x_a + (sb - sa) e``, with ``e`` the slope of the steps already taken
  extrapolated linearly in sigma to ``sb`` (the first step falls back to ``ddim``).

Per batch item the iteration stops at ``||F(x) - x|| / ||x|| < tol`` and keeps ``F(x)``;
at the cap it keeps the ``F(x)`` of smallest residual and the step is reported unconverged.
"""

from __future__ import annotations

from typing import Callable

import torch

from .core import Denoiser, Inversion, SolverError, prepare, rel_norm, run_steps, vp_scale

GUESSES = ("ddim", "extrapolate")

# update(xs, gs, rs) -> next iterate, flattened (B, n); xs/gs hold the last pairs
# (oldest first) and rs their per-item residual norms.
Update = Callable[[list, list, list], torch.Tensor]


def check_iteration(iterations: int, tol: float, guess: str, method: str) -> None:
    if int(iterations) < 1:
        raise SolverError(f"{method}: iterations must be >= 1, got {iterations}")
    if not tol > 0:
        raise SolverError(f"{method}: tol must be > 0, got {tol}")
    if guess not in GUESSES:
        raise SolverError(f"{method}: guess must be one of {GUESSES}, got {guess!r}")


def guess_point(x_a, sa, sb, space, slopes):
    """Where the iteration of one step starts; ``slopes`` are (sigma, slope) of past steps."""
    if not slopes:
        return x_a * (vp_scale(sa, space) / vp_scale(sb, space))
    s1, e1 = slopes[-1]
    e = e1
    if len(slopes) > 1:
        s0, e0 = slopes[-2]
        e = e1 + (e1 - e0) * ((sb - s1) / (s1 - s0))
    return x_a + (sb - sa) * e


def solve_step(den: Denoiser, x_a, sa, sb, x0, update: Update, iterations, tol, memory):
    """Iterate one implicit step from ``x0``; returns (x_b, slope at x_b's F, residual per item)."""
    shape = x_a.shape
    flat_a = x_a.flatten(1)
    x = x0.flatten(1)
    xs, gs, rs = [], [], []
    best = best_r = None
    for k in range(int(iterations)):
        d = den.slope(x.view(shape), sb).flatten(1)
        g = flat_a + (sb - sa) * d
        r = rel_norm(g - x, x)
        if best is None:
            best, best_r = g, r
        else:
            better = r < best_r
            best = torch.where(better[:, None], g, best)
            best_r = torch.minimum(r, best_r)
        done = best_r < tol
        if done.all() or k == int(iterations) - 1:
            break
        xs, gs, rs = (xs + [x])[-memory:], (gs + [g])[-memory:], (rs + [r])[-memory:]
        nxt = update(xs, gs, rs)
        # An item that has converged keeps its accepted value; its later evaluations are
        # only the price of batching it with the others.
        x = torch.where(done[:, None], best, nxt)
    return best.view(shape), best_r


def invert_implicit(method: str, update: Update, memory: int, model, x, sigmas, extra_args=None,
                    callback=None, space="eps", iterations=5, tol=1e-4, guess="ddim",
                    keep_trajectory=False, settings=None) -> Inversion:
    """The step loop shared by every fixed-point method; ``update`` keeps ``memory`` pairs."""
    check_iteration(iterations, tol, guess, method)
    den, x, sigmas, s = prepare(method, model, x, sigmas, extra_args, space)
    slopes, residuals, unconverged = [], [], []

    def step(i, x_a, sa, sb):
        x0 = guess_point(x_a, sa, sb, space, slopes if guess == "extrapolate" else [])
        x_b, r = solve_step(den, x_a, sa, sb, x0, update, iterations, tol, memory)
        slopes.append((sb, (x_b - x_a) / (sb - sa)))
        del slopes[:-2]
        residuals.append(float(r.max()))
        if residuals[-1] >= tol:
            unconverged.append(i)
        return x_b

    x, traj = run_steps(method, den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sigmas, method=method, space=space, nfe=den.nfe, sampler="euler",
                     settings=dict(settings or {}, iterations=int(iterations), tol=float(tol), guess=guess),
                     trajectory=traj, residuals=residuals, unconverged=unconverged)
