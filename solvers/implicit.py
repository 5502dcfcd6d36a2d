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

A method may also carry secant pairs from step to step (``carry > 0``). Every two
evaluations of one step give a pair ``(dx, dg)`` with ``dg ~ J_F dx`` and
``J_F = (h / sb) (I - J_D)``, ``h = sb - sa``, ``J_D`` the denoiser's Jacobian. For Gaussian
data ``N(mu, S)`` in EPS coordinates ``J_D = S (S + s^2)^-1``, so with ``p = (I - J_D) dx``
and ``q = s^2 J_D dx`` the relation ``q = S p`` holds at every sigma (``transport_frame``);
a pair measured at one sigma is then one at any other (``transported``):
``u = p + q / s'^2`` has ``J_F' u = (h' / s') p``. A flow state at ``s`` is the EPS state
``x / a`` at ``s / a`` (``a = 1 - s``), which gives the flow forms. Exact for Gaussian data,
approximate for mixtures and guidance; the method keeps them per item only while they pay.
"""

from __future__ import annotations

from typing import Callable

import torch

from .core import EPS, Denoiser, Inversion, SolverError, prepare, rel_norm, run_steps, vp_scale

GUESSES = ("ddim", "extrapolate")

# update(xs, gs, rs) -> next iterate, flattened (B, n); xs/gs hold the last pairs
# (oldest first) and rs their per-item residual norms. A method that carries pairs
# between steps is called update(xs, gs, rs, carried), carried a list of (dx, dg).
Update = Callable[..., torch.Tensor]

# A carried pair stays in an item's solve while each iteration at least divides that
# item's residual by this; past that it is doing no better than the step's own pairs.
CARRY_GAIN = 2.0


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


def transport_frame(dx, dg, sb, h, space):
    """A pair of one step in sigma-free form: ``p = a dx - a^2 dD``, ``q = sb^2 dD``.

    ``dD = J_D dx = dx - (sb / h) dg`` is the change of the denoised estimate; ``a = 1``
    (EPS) or ``1 - sb`` (flow). Both are scaled by ``a^2`` so that nothing divides by ``a``.
    """
    a = 1.0 if space == EPS else 1.0 - sb
    dD = dx - (sb / h) * dg
    return a * dx - a * a * dD, sb * sb * dD


def transported(p, q, sb, h, space):
    """The pair ``(u, J_F u)`` at ``(sb, h)``: ``u = p + (a / sb)^2 q``, ``J_F u = (h / sb)(u - a q / sb^2)``.

    Scaled by ``1 / a`` (a pair is linear, any common scale will do), so the flow step
    into ``sb = 1`` (``a = 0``, where ``J_F = h I``) still gets a usable pair.
    """
    a = 1.0 if space == EPS else 1.0 - sb
    u = p + (a / sb) ** 2 * q
    return u, (h / sb) * (u - (a / (sb * sb)) * q)


def solve_step(den: Denoiser, x_a, sa, sb, x0, update: Update, iterations, tol, memory, carried=None):
    """Iterate one implicit step from ``x0``.

    Returns (x_b, residual per item, the step's secant pairs ``(x_{j+1} - x_j, g_{j+1} - g_j)``).
    With ``carried`` (pairs from earlier steps, already at this sigma) the update gets them
    as its fourth argument, zeroed for an item once an iteration fails to divide its
    residual by ``CARRY_GAIN``.
    """
    shape = x_a.shape
    flat_a = x_a.flatten(1)
    x = x0.flatten(1)
    xs, gs, rs, pairs = [], [], [], []
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    best = best_r = None
    for k in range(int(iterations)):
        d = den.slope(x.view(shape), sb).flatten(1)
        g = flat_a + (sb - sa) * d
        r = rel_norm(g - x, x)
        if xs:
            pairs.append((x - xs[-1], g - gs[-1]))
            keep &= r * CARRY_GAIN <= rs[-1]
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
        if carried is None:
            nxt = update(xs, gs, rs)
        else:
            nxt = update(xs, gs, rs, [(dx * keep[:, None], dg * keep[:, None]) for dx, dg in carried])
        # An item that has converged keeps its accepted value; its later evaluations are
        # only the price of batching it with the others.
        x = torch.where(done[:, None], best, nxt)
    return best.view(shape), best_r, pairs


def invert_implicit(method: str, update: Update, memory: int, model, x, sigmas, extra_args=None,
                    callback=None, space="eps", iterations=5, tol=1e-4, guess="ddim",
                    keep_trajectory=False, settings=None, carry=0) -> Inversion:
    """The step loop shared by every fixed-point method; ``update`` keeps ``memory`` pairs.

    With ``carry > 0`` the last ``carry`` secant pairs of the earlier steps are kept in
    ``transport_frame`` form and handed, transported, to each step's update.
    """
    check_iteration(iterations, tol, guess, method)
    den, x, sigmas, s = prepare(method, model, x, sigmas, extra_args, space)
    slopes, residuals, unconverged, frames = [], [], [], []

    def step(i, x_a, sa, sb):
        h = sb - sa
        x0 = guess_point(x_a, sa, sb, space, slopes if guess == "extrapolate" else [])
        carried = [transported(p, q, sb, h, space) for p, q in frames] if carry > 0 else None
        x_b, r, pairs = solve_step(den, x_a, sa, sb, x0, update, iterations, tol, memory, carried)
        slopes.append((sb, (x_b - x_a) / h))
        del slopes[:-2]
        if carry > 0:
            frames.extend(transport_frame(dx, dg, sb, h, space) for dx, dg in pairs)
            del frames[:-carry]
        residuals.append(float(r.max()))
        if residuals[-1] >= tol:
            unconverged.append(i)
        return x_b

    x, traj = run_steps(method, den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sigmas, method=method, space=space, nfe=den.nfe, sampler="euler",
                     settings=dict(settings or {}, iterations=int(iterations), tol=float(tol), guess=guess),
                     trajectory=traj, residuals=residuals, unconverged=unconverged)
