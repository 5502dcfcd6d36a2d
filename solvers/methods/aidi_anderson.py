"""AIDI-A: fixed-point inversion with Anderson acceleration (type II).

Paper: "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", arXiv:2309.04907.
From the iterates ``x_j``, outputs ``g_j = F(x_j)`` and residuals ``r_j = g_j - x_j`` of
the last ``m`` iterations, take the differences ``dX``, ``dG``, ``dR = dG - dX`` of
consecutive ones and choose ``gamma`` minimising ``||r_k - dR gamma||``: solve
``(dR^T dR + reg I) gamma = dR^T r_k``, ``reg = lam * tr(dR^T dR) / k + TINY``, per item over
the columns it keeps (``dR`` those columns, the others get gamma 0), ``k`` the columns filled so
far (the carried ones an item dropped included) and ``TINY`` float32's smallest normal number (an
all-zero system then gives gamma = 0). ``lam`` is relative to the trace, so the solve does not
depend on the latent's scale. The next iterate is
``(1 - beta) (x_k - dX gamma) + beta (g_k - dG gamma)``; with only the differences of one
step this is the paper's form ``sum_j alpha_j ((1 - beta) x_j + beta g_j)``,
``sum_j alpha_j = 1``. The solve runs per batch item, in float32 or wider. Where an item's
residual grew at the last iteration, where its system is singular or the result is not
finite, that item takes the plain step ``g`` instead (the safeguard of the paper's
re-implementations).

The system is kept up to date as iterates arrive rather than rebuilt: a new column
``dr = r_k - r_{k-1}`` costs one product ``dR^T dr`` (it is the new row of the Gram matrix
``dR^T dR``, and ``dR^T r_k = dR^T r_{k-1} + dR^T dr`` for the columns already there), so an
iteration is O(columns x latent). The columns x columns system lives per item in Python
floats (float64), where a handful of columns costs less than torch's per-call overhead.
The step's own ``m - 1`` columns live in ring buffers. Carried pairs are never formed as
columns: every pair of a step is transported by the same two coefficients
(``implicit.transport_coefficients``), so their products come from the Gram matrices
``implicit.PairRing`` keeps as pairs arrive and from one product of its buffer with ``dr``,
and the mix reads that buffer directly.

Two things can make a step cheaper than the paper's:

- ``guess="extrapolate"`` (default): each step starts from the slopes of the previous
  steps extrapolated to the new sigma, which needs no model evaluation and starts far
  closer to the fixed point than the DDIM guess;
- ``carry`` (default 0): the last ``carry`` difference pairs of the earlier steps join
  the columns of ``dX``, ``dG``, transported to the new sigma under the Gaussian model of
  the denoiser (``implicit.transported``). The first update after the guess is then
  already a multisecant step rather than a plain one. An item drops them for the rest of
  a step once an iteration fails to halve its residual (strong guidance, where the
  Gaussian model is poor). They pay where the denoiser is close to Gaussian and not on
  the bundled model, at two latents each, so they are off by default. ``carry=0`` with
  ``guess="ddim"`` is the paper's method.

Budget, step splitting and the DDIM fallback are ``implicit``'s.
"""

import math

import torch

from ..core import SolverError
from ..implicit import DEPTH, Carried, invert_loop

# A carried pair stays in an item's solve while each iteration at least divides that
# item's residual by this; past that it is doing no better than the step's own pairs.
CARRY_GAIN = 2.0
TINY = torch.finfo(torch.float32).tiny  # keeps an all-zero system solvable (gamma = 0)


def weights(A, b, lam, k):
    """``gamma`` solving ``(A + reg I) gamma = b``, ``reg = lam tr(A) / k + TINY``, for one item's Gram
    matrix ``A`` and ``b`` (lists; ``k`` the filled columns, dropped ones included); None where
    the system is singular or gamma is not finite. Gaussian elimination with partial pivoting."""
    n = len(b)
    reg = lam * sum(A[i][i] for i in range(n)) / k + TINY
    M = [[A[i][j] + (reg if i == j else 0.0) for j in range(n)] + [b[i]] for i in range(n)]
    for col in range(n):
        piv = max(range(col, n), key=lambda i: abs(M[i][col]))
        if M[piv][col] == 0:
            return None
        M[col], M[piv] = M[piv], M[col]
        for i in range(col + 1, n):
            f = M[i][col] / M[col][col]
            for j in range(col, n + 1):
                M[i][j] -= f * M[col][j]
    gamma = [0.0] * n
    for i in reversed(range(n)):
        gamma[i] = (M[i][n] - sum(M[i][j] * gamma[j] for j in range(i + 1, n))) / M[i][i]
    return gamma if all(map(math.isfinite, gamma)) else None


class Anderson:
    """One step's Anderson state: the carried pairs (``implicit.Carried``, or a list of ``(dx, dg)``),
    then a ring of the step's own ``m - 1`` columns ``dG``, ``dR`` (and ``dX`` for ``beta < 1``)
    in (B, m - 1, n) buffers; per item ``A = dR^T dR``, ``b = dR^T r`` and the columns that take
    part, as Python lists."""

    def __init__(self, carried, m, beta, lam, guard=True):
        self.carried = carried if isinstance(carried, Carried) else Carried.of(list(carried)) if carried else None
        self.nc = len(self.carried) if self.carried else 0
        self.beta, self.lam, self.own = beta, lam, m - 1
        self.guard = guard  # an item whose residual grew takes the plain step (off: the paper's Anderson)
        self.last = None  # (x, g, r) of the previous iterate (not d: dr = dg - dx needs no earlier d)
        self.count = 0  # own pairs seen so far

    def buffer(self, x):
        return x.new_empty(x.shape[0], self.own, x.shape[1])

    def carried_dots(self, row):
        """``dR_i . v`` of the carried columns from the products ``PQ v`` (one item's list)."""
        (rp, rq), c = self.carried.coef[2], self.carried.c
        return [rp * row[i] + rq * row[c + i] for i in range(self.nc)]

    def start(self, x, d):
        B, nc, K = x.shape[0], self.nc, self.nc + self.own
        self.A = [[[0.0] * K for _ in range(K)] for _ in range(B)]
        self.b = [[0.0] * K for _ in range(B)]
        self.active = [[i < nc for i in range(K)] for _ in range(B)]
        if nc:
            car, (rp, rq) = self.carried, self.carried.coef[2]
            c = car.c
            for A, G in zip(self.A, car.G):  # R R^T with R = rp P + rq Q, from the Gram matrices of P, Q
                for i in range(nc):
                    for k in range(nc):
                        A[i][k] = rp * rp * G[i][k] + rp * rq * (G[i][c + k] + G[c + i][k]) + rq * rq * G[c + i][c + k]
            for b, row in zip(self.b, torch.bmm(car.PQ, d[..., None])[..., 0].tolist()):
                b[:nc] = self.carried_dots(row)

    def update(self, x, g, d, r):
        """Takes the new iterate into the system."""
        px, pg, pr = self.last
        nc = self.nc
        for act, a, b in zip(self.active, r, pr):
            if a * CARRY_GAIN > b:
                act[:nc] = [False] * nc
        j = None
        if self.own:
            if not self.count:  # a step that converges at its second call never needs them
                self.dR, self.dG = self.buffer(x), self.buffer(x)
                self.dX = self.buffer(x) if self.beta < 1 else None
            o = self.count % self.own
            j, self.count = nc + o, self.count + 1
            dg = torch.sub(g, pg, out=self.dG[:, o])
            dx = torch.sub(x, px, out=self.dX[:, o]) if self.dX is not None else x - px
            dr = torch.sub(dg, dx, out=self.dR[:, o])
        else:
            dr = (g - pg).sub_(x - px)
        f = min(self.count, self.own)
        # dR^T dr (the new row of A, and b's increment) and dr . d, in one list per item
        parts = [torch.bmm(self.carried.PQ, dr[..., None])[..., 0]] if nc else []
        if f:
            parts.append(torch.bmm(self.dR[:, :f], dr[..., None])[..., 0])
        parts.append(torch.bmm(dr[:, None], d[..., None])[..., 0])
        for A, b, act, row in zip(self.A, self.b, self.active, torch.cat(parts, 1).tolist()):
            c = (self.carried_dots(row) if nc else []) + row[len(row) - 1 - f:-1]
            for i, v in enumerate(c):
                b[i] += v
            if j is not None:
                for i, v in enumerate(c):
                    A[j][i] = A[i][j] = v
                b[j], act[j] = row[-1], True

    def pairs(self, n):
        """The last ``n`` (at most) of the step's own columns as pairs ``(dx, dg)``, oldest first."""
        f = min(self.count, self.own, n)
        idx = [(self.count - f + i) % self.own for i in range(f)]
        return [(self.dX[:, o] if self.dX is not None else self.dG[:, o] - self.dR[:, o], self.dG[:, o]) for o in idx]

    def mix(self, base, gammas, kind):
        """``base - D gamma`` for D the columns dG (kind "g") or dX ("x"), every item at once."""
        own = min(self.count, self.own)
        cols = []
        if self.nc:
            (cp, cq), c = self.carried.coef[1 if kind == "g" else 0], self.carried.c
            width = c if cq == 0 else 2 * c  # EPS's dG has no Q part
            cols.append((self.carried.PQ[:, :width], [[cp * v for v in gm[:self.nc]] + [0.0] * (c - self.nc) +
                                                      [cq * v for v in gm[:self.nc]] + [0.0] * (c - self.nc)
                                                      for gm in gammas], width))
        if own:
            D = (self.dG if kind == "g" else self.dX)[:, :own]
            cols.append((D, [gm[self.nc:] for gm in gammas], own))
        out = None
        for D, coef, width in cols:
            w = torch.tensor([row[:width] for row in coef], dtype=base.dtype, device=base.device)[:, None]
            out = torch.baddbmm(base[:, None], w, D, alpha=-1) if out is None else out.baddbmm_(w, D, alpha=-1)
        return out[:, 0]

    def __call__(self, x, g, d, r):
        if self.last is None:
            self.start(x, d)
            grew = [False] * len(r)
        else:
            grew = [a > b and self.guard for a, b in zip(r, self.last[2])]
            self.update(x, g, d, r)
        self.last = (x, g, r)
        k = self.nc + min(self.count, self.own)
        plain = g if self.beta == 1 else x + self.beta * d
        if k == 0 or all(grew):
            return plain
        # Per item, over the columns it keeps (the others get gamma = 0); the plain step where
        # its residual grew or its system is singular.
        gammas, use = [], []
        for A, b, act, up in zip(self.A, self.b, self.active, grew):
            idx = [i for i in range(k) if act[i]]
            gm = None if up or not idx else weights([[A[i][q] for q in idx] for i in idx], [b[i] for i in idx],
                                                    self.lam, k)
            full = [0.0] * k
            for i, v in zip(idx, gm or []):
                full[i] = v
            gammas.append(full)
            use.append(gm is not None)
        if not any(use):
            return plain
        mixed = self.mix(g, gammas, "g")
        if self.beta < 1:
            mixed = self.beta * mixed + (1 - self.beta) * self.mix(x, gammas, "x")
        # A finite sum has no non-finite term: the elementwise check (slower by far) runs only otherwise.
        if not math.isfinite(float(mixed.sum())):
            use = [a and b for a, b in zip(use, torch.isfinite(mixed).all(1).tolist())]
        if all(use):
            return mixed
        return torch.where(torch.tensor(use, device=x.device)[:, None], mixed, plain)


def anderson(m: int, beta: float, lam: float, guard: bool = True):
    return lambda carried: Anderson(carried, m, beta, lam, guard)


def invert_aidi_anderson(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, tol, guess, m,
                         beta, lam, carry, loop, keep_trajectory=False, depth=DEPTH):
    if int(m) < 1:
        raise SolverError(f"aidi_anderson: m must be >= 1, got {m}")
    if not 0 < beta <= 1:
        raise SolverError(f"aidi_anderson: beta must be in (0, 1], got {beta}")
    if not lam >= 0:
        raise SolverError(f"aidi_anderson: lam must be >= 0, got {lam}")
    if int(carry) < 0:
        raise SolverError(f"aidi_anderson: carry must be >= 0, got {carry}")
    # The paper's loop runs the paper's Anderson: no plain step where a residual grew.
    update = anderson(int(m), float(beta), float(lam), guard=loop != "paper")
    return invert_loop("aidi_anderson", update, model, x, sigmas, extra_args,
                       callback, space=space, loop=loop, iterations=iterations, tol=tol, guess=guess,
                       keep_trajectory=keep_trajectory, carry=int(carry), depth=depth)
