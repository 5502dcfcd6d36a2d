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
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .core import DEPTH, EPS, Denoiser, NonFiniteError, SolverError, notify, prepare, rel_norm, run_steps, vp_scale
from .record import Inversion

GUESSES = ("ddim", "extrapolate")

# update(carried) starts one step and returns next(x, g, d, r) -> the next iterate: it sees
# every evaluated iterate but the last x with g = F(x), d = g - x (all flattened (B, n)) and
# the per-item residual r = ||d|| / ||x|| (a list of floats), in order. ``carried``: pairs
# (dx, dg) of earlier steps, at this sigma (a list, or a ``Carried`` view of ``PairRing``). A next
# that keeps secant columns of its own may give the last n of them as ``next.pairs(n)`` (a list of
# (dx, dg), oldest first), so that the step needs to hold no earlier iterate to carry them.
Update = Callable[[list], Callable[..., torch.Tensor]]

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


def guess_point(x_a, sa, sb, space, states):
    """Where the iteration of one step starts; ``states``: (sigma, x) of the states before ``x_a``,
    newest last (the trajectory's, so the extrapolation holds no latent of its own)."""
    if not states:
        return x_a * (vp_scale(sa, space) / vp_scale(sb, space))
    h = sb - sa
    s1, x1 = states[-1]
    a1 = h / (sa - s1)  # the last step's slope (x_a - x1) / (sa - s1), carried over h
    if len(states) == 1:
        return torch.mul(x_a, 1 + a1).sub_(x1, alpha=a1)
    # The slope e extrapolated linearly in sigma: e1 + (sb - sa) (e1 - e0) / (sa - s1), with e0
    # the slope of the step before; written in the states, x_a + a1 (x_a - x1) - a0 (x1 - x0).
    s0, x0 = states[-2]
    k = h / (sa - s1)
    a1, a0 = a1 * (1 + k), h * k / (s1 - s0)
    return torch.mul(x_a, 1 + a1).add_(x1, alpha=-(a1 + a0)).add_(x0, alpha=a0)


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


@dataclass
class Carried:
    """Pairs as columns of one (B, 2c, n) buffer ``PQ`` (``P`` in slots 0..c-1, ``Q`` in c..2c-1;
    the first ``n`` of each are filled) with their Gram matrices ``G = PQ PQ^T`` per item (lists).
    ``coef`` gives ``dX``, ``dG`` and ``dR`` as ``c_p P + c_q Q`` (``transport_coefficients``), so an
    update reads every column and product of the pairs from these, and no column is formed."""
    PQ: torch.Tensor
    c: int
    n: int
    G: list
    coef: tuple

    def __len__(self):
        return self.n

    @classmethod
    def of(cls, pairs):
        """Pairs ``(dx, dg)`` as given: ``P = dx``, ``Q = dg``."""
        PQ = torch.stack([dx for dx, _ in pairs] + [dg for _, dg in pairs], 1)
        return cls(PQ, len(pairs), len(pairs), (PQ @ PQ.transpose(1, 2)).tolist(), ((1.0, 0.0), (0.0, 1.0), (-1.0, 1.0)))


class PairRing:
    """The last ``carry`` pairs in ``transport_frame`` form, kept in one ring buffer with their Gram
    matrices (``Carried``): a new pair is written in place and costs one product with the others."""

    def __init__(self, carry):
        self.carry, self.PQ, self.G, self.count = carry, None, None, 0

    def add(self, dx, dg, sb, h, space):
        c = self.carry
        if self.PQ is None:
            self.PQ = dx.new_zeros(dx.shape[0], 2 * c, dx.shape[1])
            self.G = [[[0.0] * (2 * c) for _ in range(2 * c)] for _ in range(dx.shape[0])]
        j = self.count % c
        self.count += 1
        transport_frame(dx, dg, sb, h, space, out=(self.PQ[:, j], self.PQ[:, c + j]))
        rows = torch.bmm(self.PQ, self.PQ[:, j::c].transpose(1, 2)).tolist()  # slots j and c + j: a view
        for G, row in zip(self.G, rows):
            for i, (vp, vq) in enumerate(row):
                G[i][j] = G[j][i] = vp
                G[i][c + j] = G[c + j][i] = vq

    def at(self, sb, h, space):
        n = min(self.count, self.carry)
        return Carried(self.PQ, self.carry, n, self.G, transport_coefficients(sb, h, space)) if n else []


@dataclass
class Attempt:
    """One step's iteration: per item the state it keeps ``x`` (its best iterate, or ``F`` of
    it, see the module's docstring), the best iterate's residual ``r``, its norm ``size`` and
    which items are ``done`` (lists), the last secant ``pairs`` (dx, dg), and what the DDIM
    check can reuse: the DDIM step ``ddim`` (F of the first iterate when that was the DDIM
    start) and its residual ``ddim_r``."""
    x: torch.Tensor
    r: list
    done: list
    pairs: list
    size: list
    ddim: Optional[torch.Tensor] = None
    ddim_r: Optional[list] = None


def stalls(r0, best, k, left, tol, slow=1.0) -> bool:
    """Whether an open item cannot reach ``tol`` in ``left`` calls at its mean rate over ``k`` updates."""
    open_ = [i for i, b in enumerate(best) if b >= tol]
    if left <= 0 or not open_:
        return bool(open_)
    for i in open_:
        rate = (best[i] / max(r0[i], 1e-30)) ** (1.0 / k)
        if rate > slow or math.log(tol / best[i]) / math.log(min(rate, 1 - 1e-9)) > left:
            return True
    return False


def norms(*ts):
    """Per item norms of (B, n) tensors, as lists (one transfer)."""
    return torch.stack([torch.linalg.vector_norm(t, dim=1) for t in ts]).tolist()


def residual(den: Denoiser, x, d, out):
    """Per item ``||d|| / ||x||`` and ``||x||`` as floats. A finite residual means d, x and the
    model's output are finite, so this one reduction stands in for the denoiser's own check of ``out``."""
    dn, xn = norms(d, x)
    r = [a / max(b, 1e-30) for a, b in zip(dn, xn)]
    if not all(map(math.isfinite, r)):
        den.check_output(out)
        raise NonFiniteError(f"{den.method}: the state became non-finite at step {den.step + 1}")
    return r, xn


def mask(flags, like):
    return torch.tensor(flags, device=like.device)[:, None]


def solve_step(den: Denoiser, x_a, sa, sb, x0, update: Update, calls: int, tol, carried=(), slow=1.0,
               keep=0, ddim=False) -> Attempt:
    """Iterate one implicit step from ``x0`` with at most ``calls`` model calls, stopping early
    once ``tol`` is out of reach within them or the residual shrinks by less than ``slow`` per call.

    ``keep``: how many of the last moves to return as secant pairs (the update's own columns,
    see ``Update``, and the last move); ``ddim``: ``x0`` is the DDIM start, so F(x0) is the
    DDIM step (kept for ``keep_best``)."""
    shape, flat_a, x = x_a.shape, x_a.flatten(1), x0.flatten(1)
    step = update(carried)
    c = (sb - sa) / sb
    B = x.shape[0]
    best_x = best_g = att_ddim = ddim_r = None
    best, size, lip, r0, prev, moved = [math.inf] * B, [0.0] * B, [math.inf] * B, None, None, None
    for k in range(int(calls)):
        out = den(x.view(shape), sb, check=False).flatten(1)
        g = torch.add(flat_a, torch.sub(x, out), alpha=c)  # F(x) = x_a + h d(x, sb)
        d = g - x
        r, xn = residual(den, x, d, out)
        out = None
        if ddim and k == 0:
            att_ddim = g
        elif att_ddim is not None and k == 1 and x is att_ddim:
            ddim_r = r
        r0 = r0 or r
        better = [a < b for a, b in zip(r, best)]
        if all(better):
            best_x, best_g = x, g
        elif any(better):
            w = mask(better, x)
            best_x, best_g = torch.where(w, x, best_x), torch.where(w, g, best_g)
        size = [a if w else b for a, b, w in zip(xn, size, better)]
        # |J_F| along the move into an item's first converged iterate: below 1, F(x) is closer to
        # the fixed point than x. Measured once, when an item converges (the move is also a pair).
        now = [a and r[i] < tol <= b for i, (a, b) in enumerate(zip(better, best))]
        if any(now) and prev is not None:
            moved = (k, x - prev[0], g - prev[1])  # the move into evaluation k: (dx, dg)
            lip = [a / max(b, 1e-30) if n else v for a, b, n, v in zip(*norms(moved[2], moved[1]), now, lip)]
        best = [min(a, b) for a, b in zip(r, best)]
        done = [b < tol for b in best]
        if all(done) or k == int(calls) - 1 or (k >= 2 and stalls(r0, best, k, int(calls) - k - 1, tol, slow)):
            break
        nxt = step(x, g, d, r)
        prev, d = (x, g), None  # d is not held through the next call
        # An item that has converged keeps its accepted value; its later evaluations are only
        # the price of batching it with the others.
        x = nxt if not any(done) else torch.where(mask(done, nxt), best_x, nxt)
    # In a converged step an item where F contracts takes F(x), whose residual is then below r
    # (along the last move: an estimate). In an unconverged one every item keeps the x whose
    # residual is measured, so that the residual the step reports is exactly what it keeps.
    take = [a and b < 1 for a, b in zip(done, lip)] if all(done) else [False] * B
    out = best_g if all(take) else best_x if not any(take) else torch.where(mask(take, best_x), best_g, best_x)
    pairs = []
    if keep and prev is not None:  # the update's own columns, then the move into the last evaluation
        pairs = getattr(step, "pairs", lambda n: [])(keep - 1)
        pairs.append(moved[1:] if moved and moved[0] == k else (x - prev[0], g - prev[1]))
    return Attempt(out.view(shape), best, done, pairs[-keep:] if keep else [], size, att_ddim, ddim_r)


def keep_best(den: Denoiser, att: Attempt, x_a, sa, sb, space):
    """Per item the better of the attempt's best iterate and the DDIM step; returns (x, r, DDIM taken)."""
    shape = x_a.shape
    flat_a = x_a.flatten(1)
    F = lambda x: flat_a + (sb - sa) * den.slope(x.view(shape), sb).flatten(1)
    ddim = att.ddim if att.ddim is not None else F((x_a * (vp_scale(sa, space) / vp_scale(sb, space))).flatten(1))
    r = att.ddim_r if att.ddim_r is not None else rel_norm(F(ddim) - ddim, ddim).tolist()
    take = [a < b for a, b in zip(r, att.r)]
    return torch.where(mask(take, ddim), ddim, att.x.flatten(1)).view(shape), list(map(min, r, att.r)), take


def invert_implicit(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space,
                    iterations, tol, guess, keep_trajectory=False, carry=0, depth=DEPTH) -> Inversion:
    """The step loop shared by every fixed-point method: budget, step splitting, DDIM fallback.

    With ``carry > 0`` the last ``carry`` secant pairs of the earlier steps are kept in
    ``transport_frame`` form (``PairRing``) and handed, transported, to each step's update. ``depth=0``
    keeps the given schedule (for callers that sample back down their own sigmas, such as
    a host sampler): no step is split, an unsolved one falls back as above.
    """
    check_iteration(iterations, tol, guess, method)
    den, x, sigmas, s = prepare(method, model, x, sigmas, extra_args, space)
    n, least = len(s) - 1, floor(guess)
    budget = int(iterations) * n
    norm0 = [max(v, 1e-30) for v in norms(x.flatten(1))[0]]
    sig, traj = [s[0]], [x] if keep_trajectory else None
    ring = PairRing(carry) if carry > 0 else None
    states, residuals, unconverged, kept_ddim, split, costs = deque(maxlen=2), [], [], [], [], []
    todo = [(s[i], s[i + 1], 0, i) for i in reversed(range(n))]  # a stack: the next step last
    while todo:
        sa, sb, level, i = todo.pop()
        den.step, h, left = i, sb - sa, budget - den.nfe
        share = min(left - least * len(todo), math.ceil(SHARE * left / (len(todo) + 1)))
        x0 = guess_point(x, sa, sb, space, states if guess == "extrapolate" else ())
        carried = ring.at(sb, h, space) if carry > 0 else []
        att = solve_step(den, x, sa, sb, x0, update, share - reserve(guess), tol, carried,
                         SLOW if level < depth else 1.0, carry, not states or guess == "ddim")
        for dx, dg in att.pairs:
            ring.add(dx, dg, sb, h, space)
        att.pairs = x0 = None  # these outlive the step (until the next one returns): keep nothing large
        x_b, r, size, took = att.x, att.r, att.size, None
        if not all(att.done):
            # The new sigma as the schedule will hold it, so that sampling back meets it exactly.
            sm = float(torch.tensor(split_point(sa, sb), dtype=sigmas.dtype))
            if level < depth and sa < sm < sb and budget - den.nfe >= least * (len(todo) + 2):
                todo += [(sm, sb, level + 1, i), (sa, sm, level + 1, i)]
                split.append(i)
                att = None
                continue
            x_b, r, took = keep_best(den, att, x, sa, sb, space)
            size = norms(x_b.flatten(1))[0]
        att = None
        # x_b is finite: it is an evaluated iterate or F of one, and its residual was finite.
        # The states before x_b, for the next guess: the trajectory's own when it is kept.
        if guess == "extrapolate":
            states.append((sa, x))
        j = len(residuals)
        residuals.append(max(r))
        costs.append(max(a * b / c for a, b, c in zip(r, size, norm0)))  # ||x_b|| read at the best iterate
        if took is not None:
            unconverged.append(j)
            if any(took):
                kept_ddim.append(j)
        x = x_b
        sig.append(sb)
        if traj is not None:
            traj.append(x)
        if sb == s[i + 1]:
            notify(callback, i, x, sb, den.last)
    return Inversion(latent=x, sigmas=torch.tensor(sig, dtype=sigmas.dtype, device=sigmas.device), space=space,
                     nfe=den.nfe, trajectory=traj, residuals=residuals, unconverged=unconverged, budget=budget,
                     base_steps=n, split=sorted(set(split)), kept_ddim=kept_ddim, costs=costs)


def invert_paper(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space,
                 iterations, guess, keep_trajectory=False) -> Inversion:
    """The loop the AIDI paper and the EasyInv reference code publish: each step starts at its guess
    point, takes ``iterations - 1`` updates and returns ``F`` of the last iterate, so exactly
    ``iterations`` calls a step: no tolerance, no splitting, no fallback, nothing carried."""
    den, x, sig, s = prepare(method, model, x, sigmas, extra_args, space)
    states = deque(maxlen=2)

    def step(i, x_a, sa, sb):
        shape, flat_a, c = x_a.shape, x_a.flatten(1), (sb - sa) / sb

        def F(z):  # x_a + h d(z, sb), flattened
            return torch.add(flat_a, z - den(z.view(shape), sb).flatten(1), alpha=c)

        z = guess_point(x_a, sa, sb, space, states if guess == "extrapolate" else ()).flatten(1)
        states.append((sa, x_a))
        nxt = update([])
        for _ in range(int(iterations) - 1):
            g = F(z)
            d = g - z
            z = nxt(z, g, d, rel_norm(d, z).tolist())
        return F(z).view(shape)

    x, traj = run_steps(method, den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


LOOPS = ("budget", "paper")


def invert_loop(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space, loop,
                iterations, tol, guess, keep_trajectory=False, carry=0, depth=DEPTH) -> Inversion:
    """The fixed-point methods' entry: the budgeted loop (``invert_implicit``) or the papers' (``invert_paper``,
    which takes no tolerance and carries nothing)."""
    if loop == "budget":
        return invert_implicit(method, update, model, x, sigmas, extra_args, callback, space=space,
                               iterations=iterations, tol=tol, guess=guess, keep_trajectory=keep_trajectory,
                               carry=carry, depth=depth)
    if loop != "paper":
        raise SolverError(f"{method}: loop must be one of {LOOPS}, got {loop!r}")
    if guess not in GUESSES or int(iterations) < 1:
        raise SolverError(f"{method}: the paper loop needs a guess in {GUESSES} and iterations >= 1, got "
                          f"{guess!r} and {iterations}")
    if int(carry):
        raise SolverError(f"{method}: the paper loop carries no secant pairs: set carry to 0 (got {carry})")
    return invert_paper(method, update, model, x, sigmas, extra_args, callback, space=space, iterations=iterations,
                        guess=guess, keep_trajectory=keep_trajectory)
