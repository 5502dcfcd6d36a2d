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
from .implicit import invert_implicit

# A carried pair stays in an item's solve while each iteration at least divides that
# item's residual by this; past that it is doing no better than the step's own pairs.
CARRY_GAIN = 2.0


def anderson_weights(A, b, lam, k, off=0.0):
    """Per item ``gamma`` from the Gram matrix ``A = dR^T dR`` of ``k`` columns and ``b = dR^T r``
    (regularised by ``lam`` times the mean of A's diagonal); returns (gamma, solve ok).

    ``off`` (B, K) is added to the diagonal after regularising: 1 on the empty columns."""
    reg = lam * A.diagonal(dim1=1, dim2=2).sum(-1) / k + torch.finfo(A.dtype).tiny
    gamma, info = torch.linalg.solve_ex(A + torch.diag_embed(reg[:, None] + off), b[..., None])
    return gamma[..., 0], info == 0


class Anderson:
    """One step's Anderson state: columns ``dX``, ``dR`` (B, K, n) and ``A = dR^T dR``, ``b = dR^T r``."""

    def __init__(self, carried, m, beta, lam):
        self.beta, self.lam, self.nc, self.own = beta, lam, len(carried), m - 1
        self.carried = carried
        self.last = None  # (x, r, ||r|| / ||x||) of the previous iterate
        self.count = 0  # own pairs seen so far

    def start(self, x, r):
        B, n, K = x.shape[0], x.shape[1], self.nc + self.own
        self.dX, self.dR = x.new_zeros(B, K, n), x.new_zeros(B, K, n)
        for j, (dx, dg) in enumerate(self.carried):
            self.dX[:, j] = dx
            torch.sub(dg, dx, out=self.dR[:, j])
        self.A = self.dR @ self.dR.transpose(1, 2)
        self.b = (self.dR @ r[..., None])[..., 0]
        self.active = x.new_zeros(B, K, dtype=torch.bool)
        self.active[:, :self.nc] = True

    def plain(self, x, g, r):
        return g if self.beta == 1 else x + self.beta * r

    def __call__(self, x, g, rn):
        r = g - x
        if self.last is None:
            self.start(x, r)
            grew = torch.zeros_like(rn, dtype=torch.bool)
        else:
            px, pr, prn = self.last
            grew = rn > prn
            self.active[:, :self.nc] &= (rn * CARRY_GAIN <= prn)[:, None]
            dr = r - pr
            if self.own:
                j = self.nc + self.count % self.own
                self.count += 1
                self.dX[:, j] = x - px
                self.dR[:, j] = dr
            c = (self.dR @ dr[..., None])[..., 0]  # dR^T dr: the new row of A, and b's increment
            self.b += c
            if self.own:
                self.A[:, j], self.A[:, :, j] = c, c
                self.b[:, j] = (dr * r).sum(1)
                self.active[:, j] = True
        self.last = (x, r, rn)
        k = self.nc + min(self.count, self.own)
        if k == 0:
            return self.plain(x, g, r)
        # Columns an item dropped (or has not filled) get gamma = 0 through an identity block.
        w = self.active.to(x.dtype)
        gamma, ok = anderson_weights(self.A * w[:, :, None] * w[:, None, :], self.b * w, self.lam, k, 1 - w)
        gamma = gamma * w
        # (1 - beta)(x - dX gamma) + beta (g - dG gamma), with dG = dR + dX
        mixed = x - (gamma[:, None] @ self.dX)[:, 0] + self.beta * (r - (gamma[:, None] @ self.dR)[:, 0])
        # Plain step where the residual grew or the least-squares system was singular.
        plain = grew | ~ok | ~torch.isfinite(mixed).all(1)
        return torch.where(plain[:, None], self.plain(x, g, r), mixed)


def anderson(m: int, beta: float, lam: float):
    return lambda carried: Anderson(carried, m, beta, lam)


def invert_aidi_anderson(model, x, sigmas, extra_args=None, callback=None, space="eps", iterations=5,
                         tol=1e-4, guess="extrapolate", m=3, beta=1.0, lam=1e-6, carry=8, keep_trajectory=False):
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
                           carry=int(carry))
