"""AIDI-A: fixed-point inversion with Anderson acceleration (type II).

Paper: "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", arXiv:2309.04907.
From the iterates ``x_j``, outputs ``g_j = F(x_j)`` and residuals ``r_j = g_j - x_j`` of
the last ``m`` iterations, take the differences ``dX``, ``dG``, ``dR = dG - dX`` of
consecutive ones and choose ``gamma`` minimising ``||r_k - dR gamma||``: solve
``(dR^T dR + lam * tr(dR^T dR)/n * I) gamma = dR^T r_k`` (``lam`` is relative, so the solve
does not depend on the latent's scale). The next iterate is
``(1 - beta) (x_k - dX gamma) + beta (g_k - dG gamma)``; with only the differences of one
step this is the paper's form ``sum_j alpha_j ((1 - beta) x_j + beta g_j)``,
``sum_j alpha_j = 1``. The solve runs per batch item, in float32 or wider. Where an item's
residual grew at the last iteration, where its system is singular or the result is not
finite, that item takes the plain step ``g`` instead (the safeguard of the paper's
re-implementations).

The system is kept up to date as iterates arrive rather than rebuilt: a new column
``dr = r_k - r_{k-1}`` costs one product ``dR^T dr`` (it is the new row of the Gram matrix
``dR^T dR``, and ``dR^T r_k = dR^T r_{k-1} + dR^T dr`` for the columns already there), so an
iteration is O(columns x latent) and the solve itself is on a columns x columns matrix.
Columns live in fixed slots (carried pairs first, then a ring of the step's own ``m - 1``).
Carried pairs are never copied into ``dG`` or ``dX``: every pair of a step is transported
by the same two coefficients (``implicit.transport_coefficients``), so one buffer-wide
operation writes their ``dR`` and the mix reads ``implicit.Frames``' buffers directly.

Two things make a step cheaper than the paper's (about 3 model calls per step instead
of 4 at 10 steps):

- ``guess="extrapolate"`` (default): each step starts from the slopes of the previous
  steps extrapolated to the new sigma, which needs no model evaluation and starts far
  closer to the fixed point than the DDIM guess;
- ``carry`` (default 8): the last ``carry`` difference pairs of the earlier steps join
  the columns of ``dX``, ``dG``, transported to the new sigma under the Gaussian model of
  the denoiser (``implicit.transported``). The first update after the guess is then
  already a multisecant step rather than a plain one. An item drops them for the rest of
  a step once an iteration fails to halve its residual (strong guidance, where the
  Gaussian model is poor). ``carry=0`` with ``guess="ddim"`` is the paper's method.

Budget, step splitting and the DDIM fallback are ``implicit``'s.
"""

import torch

from .core import SolverError
from .implicit import DEPTH, invert_implicit

# A carried pair stays in an item's solve while each iteration at least divides that
# item's residual by this; past that it is doing no better than the step's own pairs.
CARRY_GAIN = 2.0


def anderson_weights(A, b, lam, k, off=None):
    """Per item ``gamma`` from the Gram matrix ``A = dR^T dR`` of ``k`` columns and ``b = dR^T r``
    (regularised by ``lam`` times the mean of A's diagonal); returns (gamma, solve ok).

    ``off`` (B, K) is added to the diagonal after regularising: 1 on the empty columns."""
    reg = lam * A.diagonal(dim1=1, dim2=2).sum(-1) / k + torch.finfo(A.dtype).tiny
    diag = reg[:, None].expand(A.shape[:-1]) if off is None else reg[:, None] + off
    gamma, info = torch.linalg.solve_ex(A + torch.diag_embed(diag), b[..., None])
    return gamma[..., 0], info == 0


class Pairs:
    """Carried pairs given as a list of ``(dx, dg)``, behind the interface of ``implicit.Carried``."""

    def __init__(self, pairs):
        self.dX = torch.stack([dx for dx, _ in pairs], 1) if pairs else None
        self.dG = torch.stack([dg for _, dg in pairs], 1) if pairs else None

    def __len__(self):
        return 0 if self.dX is None else self.dX.shape[1]

    def write(self, dR):
        torch.sub(self.dG, self.dX, out=dR)
        return 1.0

    def mix(self, base, gamma, kind):
        return torch.baddbmm(base, gamma, self.dG if kind == "g" else self.dX, alpha=-1)


class Anderson:
    """One step's Anderson state: the columns ``dR`` as (B, K, n) (carried ones first, then a ring of
    the step's own), the own columns of ``dG`` (and ``dX`` for ``beta < 1``) as (B, m - 1, n),
    ``A = dR^T dR`` and ``b = dR^T r``. The carried columns of dR are held divided by
    ``scale`` (the products that read them multiply it back). Those of ``dG``, ``dX`` are never formed:
    ``carried.mix`` applies them (``implicit.Carried`` from its two frame buffers)."""

    def __init__(self, carried, m, beta, lam, work=None):
        carried = carried if hasattr(carried, "mix") else Pairs(list(carried))
        self.beta, self.lam, self.nc, self.own = beta, lam, len(carried), m - 1
        self.carried, self.work = carried, {} if work is None else work
        self.last = None  # (x, g, d, ||d|| / ||x||) of the previous iterate
        self.count = 0  # own pairs seen so far

    def start(self, x, d):
        K, nc, B = self.nc + self.own, self.nc, x.shape[0]
        self.dR = self.buffer("dR", x, K)
        self.dG = self.buffer("dG", x, self.own)
        self.dX = self.buffer("dX", x, self.own) if self.beta < 1 else None
        # Only the carried columns are filled yet: the rest of A and b is 0. Columns not yet
        # filled are never read (every product below stops at the filled ones).
        self.A, self.b = x.new_zeros(B, K, K), x.new_zeros(B, K)
        if nc:
            R = self.dR[:, :nc]
            self.scale = self.carried.write(R)  # the carried columns of dR are scale * R
            self.A[:, :nc, :nc] = (R @ R.transpose(1, 2)).mul_(self.scale ** 2)
            self.b[:, :nc] = (R @ d[..., None])[..., 0].mul_(self.scale)
        self.active = x.new_zeros(B, K, dtype=torch.bool)
        self.active[:, :nc] = True

    def buffer(self, name, x, K):
        """A (B, K, n) buffer kept from step to step: fresh large tensors cost more than the arithmetic."""
        shape = (x.shape[0], K, x.shape[1])
        t = self.work.get(name)
        if t is None or t.shape != shape or t.dtype != x.dtype or t.device != x.device:
            t = self.work[name] = x.new_empty(shape)
        return t

    def plain(self, x, g, d):
        return g if self.beta == 1 else x + self.beta * d

    def mix(self, base, gamma, own, kind):
        """``base - D gamma`` for D = dG (kind "g") or dX ("x"): carried columns, then ``own`` filled own ones."""
        nc, base = self.nc, base[:, None]
        out = self.carried.mix(base, gamma[:, None, :nc], kind) if nc else None
        if own:
            D = (self.dG if kind == "g" else self.dX)[:, :own]
            out = torch.baddbmm(base, gamma[:, None, nc:nc + own], D, alpha=-1) if out is None else \
                out.baddbmm_(gamma[:, None, nc:nc + own], D, alpha=-1)
        return out[:, 0]

    def __call__(self, x, g, d, rn):
        if self.last is None:
            self.start(x, d)
            grew = torch.zeros_like(rn, dtype=torch.bool)
        else:
            px, pg, pd, prn = self.last
            grew = rn > prn
            self.active[:, :self.nc] &= (rn * CARRY_GAIN <= prn)[:, None]
            if self.own:
                o = self.count % self.own
                j = self.nc + o
                self.count += 1
                torch.sub(g, pg, out=self.dG[:, o])
                dr = torch.sub(d, pd, out=self.dR[:, j])
                if self.dX is not None:
                    torch.sub(x, px, out=self.dX[:, o])
            else:
                dr = d - pd
            # dR^T dr over the filled columns (the others are 0): the new row of A, and b's increment
            f = self.nc + min(self.count, self.own)
            c = x.new_zeros(self.b.shape)
            if f:
                c[:, :f] = (self.dR[:, :f] @ dr[..., None])[..., 0]
                c[:, :self.nc] *= self.scale if self.nc else 1.0
            self.b += c
            if self.own:
                self.A[:, j], self.A[:, :, j] = c, c
                self.b[:, j] = (dr * d).sum(1)
                self.active[:, j] = True
        self.last = (x, g, d, rn)
        own = min(self.count, self.own)
        k = self.nc + own
        if k == 0:
            return self.plain(x, g, d)
        # Columns an item dropped (or has not filled) get gamma = 0 through an identity block.
        w = self.active.to(x.dtype)
        gamma, ok = anderson_weights(self.A * w[:, :, None] * w[:, None, :], self.b * w, self.lam, k, 1 - w)
        gamma = gamma * w
        # (1 - beta)(x - dX gamma) + beta (g - dG gamma)
        mixed = self.mix(g, gamma, own, "g")
        if self.dX is not None:
            mixed = self.beta * mixed + (1 - self.beta) * self.mix(x, gamma, own, "x")
        # Plain step where the residual grew or the least-squares system was singular. A finite
        # sum has no non-finite term; the elementwise check (slower by far) runs only otherwise.
        finite = torch.isfinite(mixed.sum(1))
        if not finite.all():
            finite = torch.isfinite(mixed).all(1)
        plain = grew | ~ok | ~finite
        return torch.where(plain[:, None], self.plain(x, g, d), mixed) if plain.any() else mixed


def anderson(m: int, beta: float, lam: float):
    work = {}  # the buffers, shared by the steps of one inversion (they run one after another)
    return lambda carried: Anderson(carried, m, beta, lam, work)


def invert_aidi_anderson(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, tol, guess, m,
                         beta, lam, carry, keep_trajectory=False, depth=DEPTH):
    if int(m) < 1:
        raise SolverError(f"aidi_anderson: m must be >= 1, got {m}")
    if not 0 < beta <= 1:
        raise SolverError(f"aidi_anderson: beta must be in (0, 1], got {beta}")
    if not lam >= 0:
        raise SolverError(f"aidi_anderson: lam must be >= 0, got {lam}")
    if int(carry) < 0:
        raise SolverError(f"aidi_anderson: carry must be >= 0, got {carry}")
    settings = {"m": int(m), "beta": float(beta), "lam": float(lam), "carry": int(carry)}
    return invert_implicit("aidi_anderson", anderson(int(m), float(beta), float(lam)), model, x, sigmas,
                           extra_args, callback, space, iterations, tol, guess, keep_trajectory, settings,
                           carry=int(carry), depth=depth)
