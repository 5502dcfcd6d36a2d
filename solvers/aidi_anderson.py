"""AIDI-A: fixed-point inversion with Anderson acceleration (type II).

From the last ``m`` iterates ``x_j``, outputs ``g_j = F(x_j)`` and residuals
``r_j = g_j - x_j``, choose weights ``alpha`` minimising ``||sum_j alpha_j r_j||`` under
``sum_j alpha_j = 1``: solve ``(R R^T + lam * tr(R R^T)/m * I) a = 1`` and normalise
``alpha = a / sum(a)`` (``lam`` is relative, so the solve does not depend on the latent's
scale). The next iterate is ``sum_j alpha_j ((1 - beta) x_j + beta g_j)``. The solve runs
per batch item, in float32 or wider. Where an item's residual grew at the last
iteration, that item takes the plain step ``g`` instead (the safeguard of the paper's
re-implementations).

By default each step starts from the slopes of the previous steps extrapolated to the
new sigma (``guess="extrapolate"``), which needs no model evaluation and starts far
closer to the fixed point than the DDIM guess.
"""

import torch

from .core import SolverError
from .implicit import invert_implicit


def anderson(m: int, beta: float, lam: float):
    def update(xs, gs, rs):
        g = gs[-1]
        if len(xs) < 2:
            return g if beta == 1 else (1 - beta) * xs[-1] + beta * g
        X, G = torch.stack(xs, 1), torch.stack(gs, 1)  # (B, k, n)
        R = G - X
        A = R @ R.transpose(1, 2)
        k = A.shape[-1]
        eye = torch.eye(k, dtype=A.dtype, device=A.device)
        reg = lam * A.diagonal(dim1=1, dim2=2).mean(-1) + torch.finfo(A.dtype).tiny
        a, info = torch.linalg.solve_ex(A + reg[:, None, None] * eye, torch.ones_like(A[..., :1]))
        alpha = a / a.sum(1, keepdim=True)
        mixed = (alpha * ((1 - beta) * X + beta * G)).sum(1)
        # Plain step where the residual grew or the least-squares system was singular.
        plain = (rs[-1] > rs[-2]) | (info != 0) | ~torch.isfinite(mixed).all(1)
        return torch.where(plain[:, None], g, mixed)
    return update


def invert_aidi_anderson(model, x, sigmas, extra_args=None, callback=None, space="eps", iterations=5,
                         tol=1e-4, guess="extrapolate", m=3, beta=1.0, lam=1e-6, keep_trajectory=False):
    if int(m) < 1:
        raise SolverError(f"aidi_anderson: m must be >= 1, got {m}")
    if not 0 < beta <= 1:
        raise SolverError(f"aidi_anderson: beta must be in (0, 1], got {beta}")
    if not lam >= 0:
        raise SolverError(f"aidi_anderson: lam must be >= 0, got {lam}")
    settings = {"m": int(m), "beta": float(beta), "lam": float(lam)}
    return invert_implicit("aidi_anderson", anderson(int(m), float(beta), float(lam)), int(m),
                           model, x, sigmas, extra_args, callback, space, iterations, tol, guess,
                           keep_trajectory, settings)
