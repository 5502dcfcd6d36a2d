"""The exact inverse of one Euler/DDIM step, found as a fixed point under a budget of model calls.

Sampling steps from ``sb`` down to ``sa`` with ``x_a = x_b + (sa - sb) d(x_b, sb)``. Its
inverse is the ``x_b`` with ``x_b = F(x_b)``, ``F(x) = x_a + (sb - sa) d(x, sb)``; ``F``
never divides by ``sa``, so the first step out of sigma = 0 is well defined. The methods
differ only in how the next iterate is chosen (``update``) and in where the iteration
starts (``guess``):

- ``ddim``: the DDIM guess point ``x_a * sqrt(1 + sb^2) / sqrt(1 + sa^2)`` (flow: ``x_a``),
  whose first ``F`` value is exactly the DDIM inversion step;
- ``extrapolate``: ``x_a + (sb - sa) e``, with ``e`` the slope of the steps already taken
  extrapolated linearly in sigma to ``sb`` (the first step falls back to ``ddim``).

An item has converged at ``r = ||F(x) - x|| / ||x|| < tol``; a step, when every item
has. ``r`` is exactly the forward-step error of ``x``: sampling from ``x`` lands at
``x_a + x - F(x)``. In a converged step an item keeps ``F(x)`` where ``F`` contracts along
the last move (``||dg|| < ||dx||``; its error is then below ``r`` to the extent that the
last move stands for the rest), else ``x`` itself. In a step that did not converge every
item keeps its ``x``, so the residual reported there is exactly what the reconstruction sees.

Budget. The whole inversion may spend ``iterations * steps`` model calls (``iterations``
is the average per step); a step may take up to ``SHARE`` times its fair share of what
is left, while every step still to do keeps the least it needs (``floor``).

Step-size control. ``J_F = (h / sb) (I - J_D)`` (``h = sb - sa``, ``J_D`` the denoiser's
Jacobian) decides whether the iteration contracts. A step stalls when, at the rate its
worst open item has shrunk so far (``(r_k / r_0)^(1/k)``, read from the third
evaluation on), ``tol`` is out of reach of its share, or when the share is spent. A
stalled step is split at ``sqrt(sa sb)`` (at ``sb / 2`` out of sigma = 0) and both halves
are solved in turn, ``DEPTH`` times deep at most. Halving ``h / sb`` halves ``J_F``; the
first step keeps ``h / sb = 1``, but there ``I - J_D ~ sb^2 / (v + sb^2)`` for data of
local variance ``v``, so a smaller ``sb`` contracts too. The inserted sigmas become the
inversion's schedule: everything that samples down ``Inversion.sigmas`` follows them.

Never worse than DDIM. A step that has not converged and cannot be split further (its
depth or the budget) keeps, per item, the evaluated iterate of smallest residual, or the
DDIM step where that reproduces the step's start better (its residual is measured with
the calls the budget kept back for it). The step is listed in ``unconverged``, and in
``kept_ddim`` where some item took the DDIM step.

A method may also carry secant pairs from step to step (``carry > 0``). Every two
evaluations of one step give a pair ``(dx, dg)`` with ``dg ~ J_F dx``. For Gaussian
data ``N(mu, S)`` in EPS coordinates ``J_D = S (S + s^2)^-1``, so with ``p = (I - J_D) dx``
and ``q = s^2 J_D dx`` the relation ``q = S p`` holds at every sigma (``transport_frame``);
a pair measured at one sigma is then one at any other (``transported``):
``u = p + q / s'^2`` has ``J_F' u = (h' / s') p``. A flow state at ``s`` is the EPS state
``x / a`` at ``s / a`` (``a = 1 - s``), which gives the flow forms. Exact for Gaussian data,
approximate for mixtures and guidance; the method keeps them per item only while they pay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .core import EPS, Denoiser, Inversion, SolverError, check_finite, notify, prepare, rel_norm, vp_scale

GUESSES = ("ddim", "extrapolate")

# update(carried) starts one step and returns next(x, g, d, r) -> the next iterate: it sees
# every evaluated iterate x with g = F(x), d = g - x (all flattened (B, n)) and the
# per-item residual r = ||d|| / ||x||, in order. ``carried``: pairs (dx, dg) of earlier
# steps, at this sigma (a list, or a ``Carried`` that writes them into the update's buffers).
Update = Callable[[list], Callable[..., torch.Tensor]]

DEPTH = 4  # a step is split at most 4 times over, into up to 16 steps
SHARE = 2.0  # a step may spend up to twice its fair share of the calls left
SLOW = 0.5  # a step whose residual shrinks slower than this per call is split, while it can be


def check_iteration(iterations: int, tol: float, guess: str, method: str) -> None:
    if guess not in GUESSES:
        raise SolverError(f"{method}: guess must be one of {GUESSES}, got {guess!r}")
    if int(iterations) < floor(guess):
        raise SolverError(f"{method}: iterations must be >= {floor(guess)} with guess {guess!r} (one call to move, "
                          f"the rest to compare an unsolved step with DDIM's), got {iterations}")
    if not tol > 0:
        raise SolverError(f"{method}: tol must be > 0, got {tol}")


def reserve(guess: str) -> int:
    """Calls kept back in each step for measuring the DDIM step should the step fail."""
    return 1 if guess == "ddim" else 2


def floor(guess: str) -> int:
    """The fewest calls a step is given: one to move, the DDIM check's reserve."""
    return 1 + reserve(guess)


def split_point(sa: float, sb: float) -> float:
    return math.sqrt(sa * sb) if sa > 0 else 0.5 * sb


def guess_point(x_a, sa, sb, space, slopes):
    """Where the iteration of one step starts; ``slopes`` are (sigma, slope) of past steps."""
    if not slopes:
        return x_a * (vp_scale(sa, space) / vp_scale(sb, space))
    s1, e1 = slopes[-1]
    e = e1
    if len(slopes) > 1:
        s0, e0 = slopes[-2]
        e = torch.sub(e1, e0).mul_((sb - s1) / (s1 - s0)).add_(e1)
    return torch.add(x_a, e, alpha=sb - sa)


def transport_frame(dx, dg, sb, h, space, out=None):
    """A pair of one step in sigma-free form: ``p = a dx - a^2 dD``, ``q = sb^2 dD``.

    ``dD = J_D dx = dx - (sb / h) dg`` is the change of the denoised estimate; ``a = 1``
    (EPS) or ``1 - sb`` (flow). Both are scaled by ``a^2`` so that nothing divides by ``a``.
    ``out``: (p, q) to write into.
    """
    a = 1.0 if space == EPS else 1.0 - sb
    p, q = out if out is not None else (torch.empty_like(dx), torch.empty_like(dx))
    dD = torch.add(dx, dg, alpha=-sb / h, out=q)
    if a == 1.0:  # p = dx - dD = (sb / h) dg
        torch.mul(dg, sb / h, out=p)
    else:
        torch.add(dx, dD, alpha=-a, out=p).mul_(a)
    return p, dD.mul_(sb * sb)


def transport_coefficients(sb, h, space):
    """``(u, J_F u, J_F u - u)`` of ``transported`` as ``c_p p + c_q q``: three (c_p, c_q).

    The same for every pair of a step, so a step transports all its carried pairs at once."""
    a = 1.0 if space == EPS else 1.0 - sb
    cu = a * a / (sb * sb)  # written so that in EPS (a = 1) cg is exactly 0
    cg = (h / sb) * (cu - a / (sb * sb))
    return (1.0, cu), (h / sb, cg), (h / sb - 1.0, cg - cu)


def transported(p, q, sb, h, space):
    """The pair ``(u, J_F u)`` at ``(sb, h)``: ``u = p + (a / sb)^2 q``, ``J_F u = (h / sb)(u - a q / sb^2)``.

    Scaled by ``1 / a`` (a pair is linear, any common scale will do), so the flow step
    into ``sb = 1`` (``a = 0``, where ``J_F = h I``) still gets a usable pair.
    """
    a = 1.0 if space == EPS else 1.0 - sb
    u = torch.add(p, q, alpha=(a / sb) ** 2)
    return u, torch.add(u, q, alpha=-a / (sb * sb)).mul_(h / sb)


class Frames:
    """The last ``carry`` pairs in ``transport_frame`` form, kept in two (B, carry, n) ring
    buffers ``P``, ``Q``: a step writes its new pairs in place and hands the update a
    ``Carried`` view instead of fresh full-size tensors per pair (their order in the
    least-squares system does not matter)."""

    def __init__(self, carry):
        self.carry, self.P, self.Q, self.count = carry, None, None, 0

    def add(self, dx, dg, sb, h, space):
        if self.P is None:
            self.P = dx.new_empty(dx.shape[0], self.carry, dx.shape[1])
            self.Q = torch.empty_like(self.P)
        j = self.count % self.carry
        self.count += 1
        transport_frame(dx, dg, sb, h, space, out=(self.P[:, j], self.Q[:, j]))

    def at(self, sb, h, space):
        n = min(self.count, self.carry)
        return Carried(self.P[:, :n], self.Q[:, :n], transport_coefficients(sb, h, space)) if n else []


@dataclass
class Carried:
    """The carried pairs of one step, transported (``transported``) into an update's columns:
    ``dR = J_F u - u`` written by ``write`` (one buffer-wide operation for all pairs), and
    ``dX = u``, ``dG = J_F u`` never formed, applied by ``mix`` straight from ``P``, ``Q``."""
    P: torch.Tensor
    Q: torch.Tensor
    coef: tuple

    def __len__(self):
        return self.P.shape[1]

    def write(self, dR):
        """Writes ``dR / s`` into ``dR`` and returns ``s``: one buffer-wide operation (the scale
        goes onto the small products of these columns instead)."""
        cp, cq = self.coef[2]
        if cq == 0:
            torch.mul(self.P, cp, out=dR)
            return 1.0
        torch.add(self.Q, self.P, alpha=cp / cq, out=dR)
        return cq

    def mix(self, base, gamma, kind):
        """``base - D gamma``, D the columns dG (kind "g") or dX ("x"); base (B, 1, n), gamma (B, 1, k)."""
        cp, cq = self.coef[1 if kind == "g" else 0]
        out = torch.baddbmm(base, gamma * cp, self.P, alpha=-1)
        return out.baddbmm_(gamma * cq, self.Q, alpha=-1) if cq != 0 else out


@dataclass
class Attempt:
    """One step's iteration: per item the state it keeps ``x`` (its best iterate, or ``F`` of
    it, see the module's docstring), the best iterate's residual ``r``, which items are
    ``done``, the secant ``pairs``, and the first two evaluations ``(x, g, r)`` for the DDIM check."""
    x: torch.Tensor
    r: torch.Tensor
    done: torch.Tensor
    pairs: list
    first: list


def stalls(r0, best, k, left, tol, slow=1.0) -> bool:
    """Whether an open item cannot reach ``tol`` in ``left`` calls at its mean rate over ``k`` updates."""
    open_ = best >= tol
    if left <= 0:
        return bool(open_.any())
    if not open_.any():
        return False
    rate = (best[open_] / r0[open_].clamp_min(1e-30)) ** (1.0 / k)
    need = torch.log(tol / best[open_]) / torch.log(rate.clamp_max(1 - 1e-9))
    return bool(((rate > slow) | (need > left)).any())


def solve_step(den: Denoiser, x_a, sa, sb, x0, update: Update, calls: int, tol, carried=(), slow=1.0,
               secants=False) -> Attempt:
    """Iterate one implicit step from ``x0`` with at most ``calls`` model calls, stopping early
    once ``tol`` is out of reach within them or the residual shrinks by less than ``slow`` per call."""
    shape, flat_a, x = x_a.shape, x_a.flatten(1), x0.flatten(1)
    step = update(carried if isinstance(carried, Carried) else list(carried))
    c = (sb - sa) / sb
    first, pairs, prev, best = [], [], None, None
    inf = x.new_full((x.shape[0],), math.inf)
    for k in range(int(calls)):
        g = torch.add(flat_a, x - den(x.view(shape), sb).flatten(1), alpha=c)  # F(x) = x_a + h d(x, sb)
        d = g - x
        r = d.norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
        if len(first) < 2:
            first.append((x, g, r))
        # |J_F| along the last move: below 1, F(x) is closer to the fixed point than x.
        if prev is None:
            lip = inf
        else:
            dx, dg = x - prev[0], g - prev[1]
            lip = dg.norm(dim=1) / dx.norm(dim=1).clamp_min(1e-30)
            if secants:
                pairs.append((dx, dg))
        prev = (x, g)
        if best is None:
            best, r0 = (x, g, r, lip), r
        elif (r < best[2]).all():
            best = (x, g, r, lip)
        elif (r < best[2]).any():
            w = r < best[2]
            best = tuple(torch.where(w[:, None] if a.ndim > 1 else w, a, b) for a, b in zip((x, g, r, lip), best))
        done = best[2] < tol
        if done.all() or k == int(calls) - 1 or (k >= 2 and stalls(r0, best[2], k, int(calls) - k - 1, tol, slow)):
            break
        x = step(x, g, d, r)
        if done.any():
            # An item that has converged keeps its accepted value; its later evaluations are
            # only the price of batching it with the others.
            x = torch.where(done[:, None], best[0], x)
    # In a converged step an item where F contracts takes F(x), whose residual is then below r
    # (along the last move: an estimate). In an unconverged one every item keeps the x whose
    # residual is measured, so that the residual the step reports is exactly what it keeps.
    take = done & (best[3] < 1) if done.all() else done & False
    out = best[1] if take.all() else best[0] if not take.any() else torch.where(take[:, None], best[1], best[0])
    return Attempt(out.view(shape), best[2], done, pairs, first)


def keep_best(den: Denoiser, att: Attempt, x_a, sa, sb, space):
    """Per item the better of the attempt's best iterate and the DDIM step; returns (x, r, DDIM taken)."""
    shape = x_a.shape
    flat_a = x_a.flatten(1)
    F = lambda x: flat_a + (sb - sa) * den.slope(x.view(shape), sb).flatten(1)
    start = (x_a * (vp_scale(sa, space) / vp_scale(sb, space))).flatten(1)
    x0, g0, _ = att.first[0]
    ddim = g0 if torch.equal(x0, start) else F(start)
    seen = [r for x, _, r in att.first[1:] if torch.equal(x, ddim)]
    r = seen[0] if seen else rel_norm(F(ddim) - ddim, ddim)
    take = r < att.r
    return torch.where(take[:, None], ddim, att.x.flatten(1)).view(shape), torch.minimum(r, att.r), take


def invert_implicit(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, space="eps",
                    iterations=5, tol=1e-4, guess="ddim", keep_trajectory=False, settings=None,
                    carry=0, depth=DEPTH) -> Inversion:
    """The step loop shared by every fixed-point method: budget, step splitting, DDIM fallback.

    With ``carry > 0`` the last ``carry`` secant pairs of the earlier steps are kept in
    ``transport_frame`` form (``Frames``) and handed, transported, to each step's update. ``depth=0``
    keeps the given schedule (for callers that sample back down their own sigmas, such as
    a host sampler): no step is split, an unsolved one falls back as above.
    """
    check_iteration(iterations, tol, guess, method)
    den, x, sigmas, s = prepare(method, model, x, sigmas, extra_args, space)
    n, least = len(s) - 1, floor(guess)
    budget = int(iterations) * n
    norm0 = x.flatten(1).norm(dim=1).clamp_min(1e-30)
    sig, traj = [s[0]], [x] if keep_trajectory else None
    frames = Frames(carry) if carry > 0 else None
    slopes, residuals, unconverged, kept_ddim, split, costs = [], [], [], [], [], []
    todo = [(s[i], s[i + 1], 0, i) for i in reversed(range(n))]  # a stack: the next step last
    while todo:
        sa, sb, level, i = todo.pop()
        den.step, h, left = i, sb - sa, budget - den.nfe
        share = min(left - least * len(todo), math.ceil(SHARE * left / (len(todo) + 1)))
        x0 = guess_point(x, sa, sb, space, slopes if guess == "extrapolate" else [])
        carried = frames.at(sb, h, space) if carry > 0 else []
        att = solve_step(den, x, sa, sb, x0, update, share - reserve(guess), tol, carried,
                         SLOW if level < depth else 1.0, carry > 0)
        if carry > 0:
            for dx, dg in att.pairs[-carry:]:
                frames.add(dx, dg, sb, h, space)
        x_b, r, took = att.x, att.r, None
        if not att.done.all():
            # The new sigma as the schedule will hold it, so that sampling back meets it exactly.
            sm = float(torch.tensor(split_point(sa, sb), dtype=sigmas.dtype))
            if level < depth and sa < sm < sb and budget - den.nfe >= least * (len(todo) + 2):
                todo += [(sm, sb, level + 1, i), (sa, sm, level + 1, i)]
                split.append(i)
                continue
            x_b, r, took = keep_best(den, att, x, sa, sb, space)
        if not torch.isfinite(x_b.sum()):  # a finite sum has no non-finite term: the full check only then
            x_b = check_finite(x_b, method, i)
        slopes.append((sb, (x_b - x) / h))
        del slopes[:-2]
        j = len(residuals)
        residuals.append(float(r.max()))
        costs.append(float((r * x_b.flatten(1).norm(dim=1) / norm0).max()))
        if took is not None:
            unconverged.append(j)
            if took.any():
                kept_ddim.append(j)
        x = x_b
        sig.append(sb)
        if traj is not None:
            traj.append(x)
        if sb == s[i + 1]:
            notify(callback, i, x, sb, den.last)
    return Inversion(latent=x, sigmas=torch.tensor(sig, dtype=sigmas.dtype, device=sigmas.device), method=method,
                     space=space, nfe=den.nfe, sampler="euler", trajectory=traj, residuals=residuals,
                     unconverged=unconverged,
                     settings=dict(settings or {}, iterations=int(iterations), tol=float(tol), guess=guess),
                     budget=budget, base_steps=n, split=sorted(set(split)), kept_ddim=kept_ddim, costs=costs)
