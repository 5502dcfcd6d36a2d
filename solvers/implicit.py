"""The exact inverse of one Euler/DDIM step, found as a fixed point within a round-trip target and a call budget.

Sampling steps from ``sb`` down to ``sa`` with ``x_a = x_b + (sa - sb) d(x_b, sb)``. Its
inverse is the ``x_b`` with ``x_b = F(x_b)``, ``F(x) = x_a + (sb - sa) d(x, sb)``; ``F``
never divides by ``sa``, so the first step out of sigma = 0 is well defined. The methods
differ only in how the next iterate is chosen (``update``) and in where the iteration
starts (``guess``):

- ``ddim``: the DDIM guess point ``x_a * sqrt(1 + sb^2) / sqrt(1 + sa^2)`` (flow: ``x_a``),
  whose first ``F`` value is exactly the DDIM inversion step;
- ``extrapolate``: ``x_a + (sb - sa) e``, with ``e`` the slope of the steps already taken
  extrapolated linearly in log sigma to ``sb`` (the first step falls back to ``ddim``).

The error a step leaves. ``d = F(x) - x`` is exactly the forward-step error of ``x``:
sampling from ``x`` lands at ``x_a - d``. Sampling on down carries that error to the
source through the later steps. For Gaussian data (of any variance, in either space) an
error of relative size ``||d|| / ||x||`` reaches the source at about the same relative size,
so the round trip misses the source by about the sum of the steps' relative residuals. That
sum is the estimate ``Inversion.costs`` records (one term a step); data far from Gaussian
(sharp modes, strong guidance, a flow model's high-variance directions near sigma = 1) can
shrink or grow it, which is why the node measures the round trip by default. In flow space
the sampling grows errors in the latent's high-variance directions by up to ``1 / (1 - s)``;
``weight`` counts a step's error that much more (at most ``FLOW_SPREAD``). What a step
keeps: ``F(x)`` of its best iterate where ``F`` contracts (``lip < 1``, the largest
``||dg|| / ||dx||`` over the step's moves; its error ``~ lip ||d||``, an estimate), else
``x`` (its error exact). ``Inversion.residuals`` records the best iterate's own, measured.

Precision that pays. ``tol`` is the relative round-trip error asked for. It is shared out
equally over the given steps (a split step's halves share its part), and a step is solved
once its kept relative error, times its ``weight``, is within its part, or its calls are spent.

Budget. The whole inversion may spend ``iterations * steps`` model calls (``iterations``
is the average per step); a step may take its fair share of what is left (what a solved
step leaves goes to the steps after it), while every step still to do keeps ``FLOOR``
(one call to move, one to measure the move). A small budget buys what it can: every
step keeps its best candidate, whatever the target.

Step splitting. A step stalls when, at the rate its worst open item has shrunk so far
(from the third evaluation on), its part of the target is out of reach of its calls or the
error shrinks by less than ``SLOW`` a call. A stalled step is split at ``sqrt(sa sb)`` (at
``sb / 2`` out of sigma = 0) and both halves are solved in turn, ``DEPTH`` times deep at
most, while the calls left still average ``FLOOR + CHECK`` a step (a step out of sigma = 0
into quarters at once, see ``Stack.halve``). Halving ``h / sb``
halves ``J_F = (h / sb)(I - J_D)``. The inserted sigmas become the inversion's schedule:
everything that samples down ``Inversion.sigmas`` follows them.

About DDIM. A step that has not reached its part and cannot be split further keeps, per
item, its best candidate. From the DDIM guess the DDIM step is the second iterate; from an
extrapolated one it is measured with ``CHECK`` calls the step kept back where it was given
``FLOOR + CHECK`` calls or more (per item the better by forward error ``||d||``, absolute:
what reaches the reconstruction). A step given fewer (2 or 3 calls a step) spends them all
on its own iteration from the extrapolated guess: on the bundled model, at 2 calls a step,
that ends at 0.04 to 0.91 of the DDIM inversion's round-trip error (10, 20 and 50 steps,
both spaces, cfg 1 and 3). From the DDIM guess (``guess="ddim"``) at 2 calls a step the
round trip ends up to 1.24 times further off than DDIM's there (flow, cfg 3, 10 and 20
steps): F of the DDIM step is kept on one move's estimate. From its third evaluation on,
an unsolved step keeps the update's next iterate where its estimated error is the smaller
(``proposed``).
The step is listed in ``unconverged``, and in ``kept_ddim`` where some item kept the DDIM
step. None of this is a guarantee end to end, which is what the node's measured round trip
is for.

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
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .core import DEPTH, EPS, Denoiser, NonFiniteError, SolverError, notify, prepare, run_steps, vp_scale
from .record import Inversion

GUESSES = ("ddim", "extrapolate")

# update(carried) starts one step and returns next(x, g, d, r) -> the next iterate: it sees
# every evaluated iterate but the last x with g = F(x), d = g - x (all flattened (B, n)) and
# the per-item residual r = ||d|| / ||x|| (a list of floats), in order. ``carried``: pairs
# (dx, dg) of earlier steps, at this sigma (a list, or a ``Carried`` view of ``PairRing``). A next
# that keeps secant columns of its own may give the last n of them as ``next.pairs(n)`` (a list of
# (dx, dg), oldest first), so that the step needs to hold no earlier iterate to carry them.
Update = Callable[[list], Callable[..., torch.Tensor]]

SHARE = 1.0  # a step may spend its fair share of the calls left (what a solved step leaves goes on)
SLOW = 0.5  # a step whose error shrinks slower than this per call is split, while it can be
FLOOR = 2  # the fewest calls a step is given: one to move, one to measure the move
FLOW_SPREAD = 4.0  # see weight: a flow latent's directions up to 4 times the noise's scale
CHECK = 2  # the DDIM check's calls: the DDIM step, then its error


def check_iteration(iterations: int, tol: float, guess: str, method: str) -> None:
    if guess not in GUESSES:
        raise SolverError(f"{method}: guess must be one of {GUESSES}, got {guess!r}")
    if int(iterations) < FLOOR:
        raise SolverError(f"{method}: iterations must be >= {FLOOR} (one call to move a step, one to measure the "
                          f"move), got {iterations}")
    if not tol > 0:
        raise SolverError(f"{method}: tol must be > 0, got {tol}")


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
    # The slope e extrapolated linearly in log sigma: e1 + L (e1 - e0), L = log(sb / sa) / log(sa / s1),
    # with e0 the slope of the step before (in sigma it overshoots on the long steps of a short schedule:
    # 1.7e-2 against 7e-3 relative on the bundled model at 10 steps); written in the states,
    # x_a + a1 (x_a - x1) - a0 (x1 - x0).
    s0, x0 = states[-2]
    k = math.log(sb / sa) / math.log(sa / s1)
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


def norms(*ts):
    """Per item norms of (B, n) tensors, as one (len(ts), B) float64 CPU tensor (one transfer)."""
    return torch.stack([torch.linalg.vector_norm(t, dim=1) for t in ts]).to("cpu", torch.float64)


def rows(flags, like):
    """A (B,) CPU bool tensor as a (B, 1) mask on ``like``'s device."""
    return flags.to(like.device)[:, None]


def pick(flags, a, b):
    """Per row ``a`` where ``flags`` else ``b`` (no copy where all rows agree)."""
    return a if bool(flags.all()) else b if not bool(flags.any()) else torch.where(rows(flags, a), a, b)


@dataclass
class Best:
    """Per item (a row each), a step's evaluated iterate of smallest forward error so far: ``x`` and
    ``g = F(x)`` ((B, n)), and as (B,) float64 CPU tensors ``err = ||g - x||``, ``size = ||x||`` and
    ``k``, which evaluation it was."""
    x: torch.Tensor
    g: torch.Tensor
    err: torch.Tensor
    size: torch.Tensor
    k: torch.Tensor

    def offer(self, x, g, err, size, k):
        """Takes the new iterate for the items where its forward error is smaller."""
        w = err < self.err
        if bool(w.any()):
            self.x, self.g = pick(w, x, self.x), pick(w, g, self.g)
            self.err, self.size = torch.where(w, err, self.err), torch.where(w, size, self.size)
            self.k = torch.where(w, float(k), self.k)

    def kept(self, lip):
        """Per item what the step keeps, its forward error relative to its norm, and which items keep
        ``F(x)``: that where ``F`` contracts (``lip < 1``, the largest ``||dg|| / ||dx||`` of the step's
        moves; its error ``||F(F(x)) - F(x)|| ~ lip err``, an estimate), else ``x`` (its error exact)."""
        f = lip < 1
        return pick(f, self.g, self.x), torch.where(f, lip, 1.0) * self.err / self.size.clamp_min(1e-30), f


def stalls(first, err, k, left, target, slow) -> bool:
    """Whether an open item (``err > target``) cannot reach ``target`` in ``left`` calls at its mean
    rate over ``k`` updates, or shrinks by less than ``slow`` a call."""
    open_ = err > target
    if not bool(open_.any()):
        return False
    if left <= 0:
        return True
    rate = (err / first.clamp_min(1e-300)) ** (1.0 / k)
    need = math.log(target) - torch.log(err)
    return bool(((rate > slow) | (need / torch.log(rate.clamp_max(1 - 1e-9)) > left))[open_].any())


@dataclass
class Attempt:
    """One step's result, per item ((B,) tensors): the state it keeps ``x``, that state's relative
    forward error ``err`` (estimated where it is ``F`` of the best iterate), the best iterate's own,
    measured, ``r``, ``ddim`` where it is the DDIM step (the second iterate from the DDIM guess, kept
    as is), ``done`` where ``err`` is within the step's target; ``pairs``: its last secant pairs."""
    x: torch.Tensor
    err: torch.Tensor
    r: torch.Tensor
    ddim: torch.Tensor
    done: torch.Tensor
    pairs: list


def solve_step(den: Denoiser, *, x_a, sa, sb, start, update: Update, calls: int, target: float, carried=(),
               slow=1.0, keep=0, ddim_start=False) -> Attempt:
    """Iterate one step from ``start`` with at most ``calls`` model calls until every item's kept error is
    within ``target`` (relative), or it ``stalls``. ``keep``: how many secant pairs to return (the update's
    own columns, see ``Update``, then the last move); ``ddim_start``: ``start`` is the DDIM guess."""
    F, x, step, calls = Map(den, x_a, sa, sb), start.flatten(1), update(carried), int(calls)
    best = prev = first = lip = r_prev = None
    for k in range(calls):
        g, d, r, err, size, move = F.evaluate(x, prev)
        # F's contraction: the largest measured over the step's moves (none yet: unknown, inf)
        lip = torch.full_like(err, math.inf) if k == 0 else move if k == 1 else torch.maximum(lip, move)
        if best is None:
            best = Best(x, g, err, size, torch.zeros_like(err))
        best.offer(x, g, err, size, k)
        now = best.kept(lip)[1]
        first = now if first is None else first
        if not bool((now > target).any()) or k == calls - 1 or (
                k >= 2 and stalls(first, now, k, calls - k - 1, target, slow)):
            break
        nxt, prev, r_prev = step(x, g, d, r.tolist()), (x, g), r
        x = pick(now <= target, best.x, nxt)  # a solved item keeps its value; later calls only batch it
    out, err, f = best.kept(lip)
    pairs = []
    if keep and prev is not None:
        pairs = (getattr(step, "pairs", lambda n: [])(keep - 1) + [(x - prev[0], g - prev[1])])[-keep:]
    ddim = (best.k == 1) & ~f & ddim_start
    if k >= 2 and bool((err > target).any()):  # a rate from one move alone is no measure
        pairs = [(a.clone(), b.clone()) for a, b in pairs]  # views of the update's buffers, which it may write
        out, err, ddim = proposed(step, x, g, d, r, r_prev, best, k, out, err, ddim)
    return Attempt(out.view(x_a.shape), err, best.err / best.size.clamp_min(1e-30), ddim, err <= target, pairs)


def proposed(step, x, g, d, r, r_prev, best, k, out, err, ddim):
    """An unsolved step's last word: the update's next iterate, unevaluated, where its estimated error is
    below that of what the step keeps. Its estimate is the last iterate's residual times the factor the
    last call shrank it by (taken only where that iterate is the best and it shrank); for Anderson that
    beats ``F`` of the best iterate (bundled model, 3 calls a step: +0.7 to +3.5 dB)."""
    rate = r / r_prev.clamp_min(1e-300)
    est = rate * r
    take = (best.k == k) & (rate < 1) & (est < err)
    if not bool(take.any()):
        return out, err, ddim
    nxt = step(x, g, d, r.tolist())
    if not math.isfinite(float(nxt.sum())):
        return out, err, ddim
    return pick(take, nxt, out), torch.where(take, est, err), ddim & ~take


class Map:
    """``F(x) = x_a + (sb - sa) d(x, sb)`` of one step, on flattened (B, n) iterates."""

    def __init__(self, den, x_a, sa, sb):
        self.den, self.shape, self.flat_a, self.sb, self.c = den, x_a.shape, x_a.flatten(1), sb, (sb - sa) / sb

    def evaluate(self, x, prev=None):
        """``g = F(x)``, ``d = g - x`` and per item ``r = ||d|| / ||x||``, ``||d||``, ``||x||`` and the
        contraction ``||dg|| / ||dx||`` along the move from ``prev`` = (x', F(x')) (None: no move, 0)."""
        out = self.den(x.view(self.shape), self.sb, check=False).flatten(1)
        g = torch.add(self.flat_a, torch.sub(x, out), alpha=self.c)
        d = g - x
        if prev is None:
            dn, xn = norms(d, x)
            lip = torch.zeros_like(dn)
        else:
            dn, xn, dxn, dgn = norms(d, x, x - prev[0], g - prev[1])
            lip = dgn / dxn.clamp_min(1e-300)
        r = dn / xn.clamp_min(1e-30)
        if not bool(torch.isfinite(r).all()):  # a finite residual means d, x and the model's output are finite
            self.den.check_output(out)
            raise NonFiniteError(f"{self.den.method}: the state became non-finite at step {self.den.step + 1}")
        return g, d, r, dn, xn, lip


def ddim_check(den: Denoiser, att: Attempt, *, x_a, sa, sb, space) -> Attempt:
    """Per item the better, by forward error ``||d||`` (what reaches the reconstruction), of the attempt's
    kept state and the DDIM step (2 calls: the DDIM step, then its error). Where the attempt keeps ``F`` of
    its best iterate, whose error is estimated, the iterate's measured error stands in for it."""
    F = Map(den, x_a, sa, sb)
    step = F.evaluate((x_a * (vp_scale(sa, space) / vp_scale(sb, space))).flatten(1))[0]
    _, _, _, dn, xn, _ = F.evaluate(step)
    kept = att.x.flatten(1)
    take = dn < torch.maximum(att.err, att.r) * norms(kept)[0]  # F(x)'s error is an estimate: x's bounds it
    r = torch.where(take, dn / xn.clamp_min(1e-30), att.err)
    x = pick(take, step, kept).view(x_a.shape)
    return Attempt(x, r, torch.where(take, r, att.r), take | att.ddim, att.done, [])


class Budget:
    """The model calls of the whole inversion: ``total``, of which ``den`` has spent ``den.nfe``."""

    def __init__(self, den: Denoiser, total: int):
        self.den, self.total = den, total

    def share(self, todo: int) -> int:
        """A step's calls: up to ``SHARE`` times its fair share of what is left, ``FLOOR`` kept for each
        of the ``todo`` steps after it."""
        left = self.total - self.den.nfe
        return min(left - FLOOR * todo, math.ceil(SHARE * left / (todo + 1)))

    def fair(self, todo: int) -> float:
        """The calls left per step, over ``todo`` steps."""
        return (self.total - self.den.nfe) / max(todo, 1)


@dataclass
class Piece:
    """A step to solve: from ``sa`` to ``sb``, split ``level`` times, of base step ``i``, with ``part``
    of the relative round-trip target."""
    sa: float
    sb: float
    level: int
    i: int
    part: float


class Stack:
    """The steps still to solve, the next one last; a stalled step is replaced by its two halves (``halve``),
    each with half its part of the target."""

    def __init__(self, s, tol, dtype):
        n = len(s) - 1
        self.todo = [Piece(s[i], s[i + 1], 0, i, tol / n) for i in reversed(range(n))]
        self.dtype, self.split = dtype, []

    def __len__(self):
        return len(self.todo)

    def pop(self) -> Piece:
        return self.todo.pop()

    def halve(self, p: Piece, *, depth: int, budget: Budget) -> bool:
        """Splits ``p`` at ``split_point`` where depth and budget allow (every step left still gets the
        calls of an extrapolated step and its DDIM check on average); returns whether it did. A stalled
        step out of sigma = 0 is split into quarters at once: its lower half has ``h / sb = 1`` again and
        ``J_F = I - J_D`` only a little smaller, so it stalls again (bundled model: every time), and the
        calls of that second try are saved (0.3 to 0.8 calls a step at 10 steps)."""
        if not self.cut(p, depth=depth, budget=budget):
            return False
        if p.sa == 0:  # where depth and budget allow; else the halves stand
            self.cut(self.todo[-1], depth=depth, budget=budget, pop=True)
        self.split.append(p.i)
        return True

    def cut(self, p: Piece, *, depth: int, budget: Budget, pop=False) -> bool:
        """Replaces ``p`` (the next piece where ``pop``) by its halves, each with half its part."""
        # The new sigma as the schedule will hold it, so that sampling back meets it exactly.
        sm = float(torch.tensor(split_point(p.sa, p.sb), dtype=self.dtype))
        if p.level >= depth or not p.sa < sm < p.sb or budget.fair(len(self) + 2 - pop) < FLOOR + CHECK:
            return False
        if pop:
            self.todo.pop()
        self.todo += [Piece(sm, p.sb, p.level + 1, p.i, p.part / 2), Piece(p.sa, sm, p.level + 1, p.i, p.part / 2)]
        return True


@dataclass
class Trace:
    """What the loop records as it accepts steps (``Inversion``'s fields of the same names)."""
    sig: list
    traj: Optional[list]
    residuals: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    unconverged: list = field(default_factory=list)
    kept_ddim: list = field(default_factory=list)

    def accept(self, att: Attempt, sb, w):
        """Records step ``att`` (ending at ``sb``; ``w``: its ``weight``)."""
        j = len(self.residuals)
        self.residuals.append(float(att.r.max()))
        self.costs.append(float(att.err.max()) * w)
        if not bool(att.done.all()):
            self.unconverged.append(j)
            if bool(att.ddim.any()):
                self.kept_ddim.append(j)
        self.sig.append(sb)
        if self.traj is not None:
            self.traj.append(att.x)


def weight(sb: float, space: str) -> float:
    """How much more than its relative size an error at ``sb`` may weigh at the source: 1 in EPS; in
    flow the sampling's gain in a direction of variance ``v`` over the unit noise, ``sqrt(v) /
    sqrt(v (1 - s)^2 + s^2)``, is up to ``1 / (1 - s)`` for large ``v`` and ``sqrt(v)`` at ``s = 1``;
    taken for directions up to ``FLOW_SPREAD`` noise scales."""
    return 1.0 if space == EPS else min(1.0 / max(1.0 - sb, 1e-9), FLOW_SPREAD)


def solve_piece(den, p: Piece, x, *, space, update, guess, states, budget, stack, ring, slow):
    """One piece: its guess, the carried pairs, the iteration; the pairs it leaves go into ``ring``.
    Returns the attempt and whether it kept ``CHECK`` calls back for the DDIM check: an extrapolated start
    does where it is given ``FLOOR + CHECK`` calls or more; one given fewer spends them all on its own
    iteration, which at 2 and 3 calls a step ends far closer than the DDIM step (and than starting at
    the DDIM point, whose second iterate is the DDIM step)."""
    h, calls = p.sb - p.sa, budget.share(len(stack))
    at_ddim = guess == "ddim" or not states
    check = not at_ddim and calls >= FLOOR + CHECK
    start = guess_point(x, p.sa, p.sb, space, () if at_ddim else states)
    att = solve_step(den, x_a=x, sa=p.sa, sb=p.sb, start=start, update=update,
                     calls=calls - CHECK if check else calls, target=p.part / weight(p.sb, space),
                     carried=ring.at(p.sb, h, space) if ring else [], slow=slow, keep=ring.carry if ring else 0,
                     ddim_start=at_ddim)
    for dx, dg in att.pairs:
        ring.add(dx, dg, p.sb, h, space)
    att.pairs = []  # they outlive the step (until the next one returns): keep nothing large
    return att, check


def invert_implicit(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space,
                    iterations, tol, guess, carry, keep_trajectory=False, depth=DEPTH) -> Inversion:
    """The step loop shared by every fixed-point method: target, budget, step splitting, DDIM fallback.

    With ``carry > 0`` the last ``carry`` secant pairs of the earlier steps are kept in
    ``transport_frame`` form (``PairRing``) and handed, transported, to each step's update. ``depth=0``
    keeps the given schedule (for callers that sample back down their own sigmas): no step is split.
    """
    check_iteration(iterations, tol, guess, method)
    den, x, sigmas, s = prepare(method, model, x, sigmas, extra_args, space)
    budget, stack = Budget(den, int(iterations) * (len(s) - 1)), Stack(s, tol, sigmas.dtype)
    ring, states = PairRing(carry) if carry > 0 else None, deque(maxlen=2)
    trace = Trace([s[0]], [x] if keep_trajectory else None)
    while stack:
        p = stack.pop()
        den.step = p.i
        att, check = solve_piece(den, p, x, space=space, update=update, guess=guess, states=states,
                                 budget=budget, stack=stack, ring=ring, slow=SLOW if p.level < depth else 1.0)
        if not bool(att.done.all()):
            if stack.halve(p, depth=depth, budget=budget):
                continue
            if check:
                att = ddim_check(den, att, x_a=x, sa=p.sa, sb=p.sb, space=space)
        if guess == "extrapolate":
            states.append((p.sa, x))
        trace.accept(att, p.sb, weight(p.sb, space))
        x = att.x
        if p.sb == s[p.i + 1]:
            notify(callback, p.i, x, p.sb, den.last)
    return Inversion(latent=x, sigmas=torch.tensor(trace.sig, dtype=sigmas.dtype, device=sigmas.device), space=space,
                     nfe=den.nfe, trajectory=trace.traj, residuals=trace.residuals, unconverged=trace.unconverged,
                     budget=budget.total, base_steps=len(s) - 1, split=sorted(set(stack.split)),
                     kept_ddim=trace.kept_ddim, costs=trace.costs)


def invert_paper(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space,
                 iterations, guess, keep_trajectory=False) -> Inversion:
    """The loop the AIDI paper and the EasyInv reference code publish: each step starts at its guess
    point, takes ``iterations - 1`` updates and returns ``F`` of the last iterate, so exactly
    ``iterations`` calls a step: no tolerance, no splitting, no fallback, nothing carried."""
    den, x, sig, s = prepare(method, model, x, sigmas, extra_args, space)
    states = deque(maxlen=2)

    def step(i, x_a, sa, sb):
        F = Map(den, x_a, sa, sb)
        z = guess_point(x_a, sa, sb, space, states if guess == "extrapolate" else ()).flatten(1)
        states.append((sa, x_a))
        nxt = update([])
        for _ in range(int(iterations) - 1):
            g, d, r = F.evaluate(z)[:3]
            z = nxt(z, g, d, r.tolist())
        return F.evaluate(z)[0].view(x_a.shape)

    x, traj = run_steps(method, den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


LOOPS = ("budget", "paper")


def invert_loop(method: str, update: Update, model, x, sigmas, extra_args=None, callback=None, *, space, loop,
                iterations, tol, guess, carry, keep_trajectory=False, depth=DEPTH) -> Inversion:
    """The fixed-point methods' entry: the budgeted loop (``invert_implicit``) or the papers' (``invert_paper``,
    which takes no tolerance and carries nothing: ``registry.invert`` records no ``tol`` for it)."""
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
