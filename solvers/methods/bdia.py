"""BDIA: exact inversion by bi-directional integration approximation, 1 NFE per step.

Paper: Zhang et al., "Exact Diffusion Inversion via Bi-directional Integration
Approximation", ECCV 2024, arXiv:2307.10829 (official code: guoqiang-zhang-x/BDIA).

With ``T(x_i -> s_j) = x_i + (s_j - s_i) d(x_i, s_i)`` (an Euler/DDIM step from ``s_i`` to
``s_j``), sampling takes two states to the next one,
``x_{i-1} = g_i (x_{i+1} - T(x_i -> s_{i+1})) + T(x_i -> s_{i-1})``,
and is undone in closed form:
``x_{i+1} = T(x_i -> s_{i+1}) + (x_{i-1} - T(x_i -> s_{i-1})) / g_i``.
``g_i = gamma * sqrt(1 + s_{i-1}^2) / sqrt(1 + s_{i+1}^2)`` in EPS space (the paper's gamma
in signal-preserving coordinates) and ``g_i = gamma`` for flow. The first inversion step
is plain DDIM; the inverted state is the pair ``(x_N, x_{N-1})`` and sampling must resume
from it. Exact up to float rounding, which each inverse step amplifies by ``1 / g_i``.
The paper edits with gamma from 0.92 to 1.0 (its choice: the registry's default). Rounding
is the only error.
"""

from ..core import SolverError, check_finite, notify, prepare, vp_scale
from ..record import Inversion
from .ddim import ddim_slope


def check_gamma(gamma):
    # The registry's range (it checks it first); repeated for direct callers and the records' sampler.
    if not 0.5 <= gamma <= 1:
        raise SolverError(f"bdia: gamma must be from 0.5 to 1.0, got {gamma}")


def g(gamma, s_lo, s_hi, space):
    """BDIA's coefficient for the step that spans ``s_lo < s_i < s_hi``."""
    return gamma * vp_scale(s_hi, space) / vp_scale(s_lo, space)


def invert_bdia(model, x, sigmas, extra_args=None, callback=None, *, space, gamma, keep_trajectory=False):
    check_gamma(gamma)
    den, x0, sig, s = prepare("bdia", model, x, sigmas, extra_args, space)
    x1 = check_finite(x0 + s[1] * ddim_slope(den, x0, 0.0, s[1], space), "bdia", 0)
    notify(callback, 0, x1, s[1], den.last)
    traj = [x0, x1] if keep_trajectory else None
    prev, cur = x0, x1
    for i in range(1, len(s) - 1):
        den.step = i
        d = den.slope(cur, s[i])
        nxt = cur + (s[i + 1] - s[i]) * d + (prev - (cur + (s[i - 1] - s[i]) * d)) / g(gamma, s[i - 1], s[i + 1], space)
        prev, cur = cur, check_finite(nxt, "bdia", i)
        if traj is not None:
            traj.append(cur)
        notify(callback, i, cur, s[i + 1], den.last)
    return Inversion(latent=cur, pair=prev, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


def sample_bdia(model, x, sigmas, extra_args=None, callback=None, *, space, pair=None, gamma):
    """Sample down a descending schedule; ``pair`` is the state at ``sigmas[1]`` (else one Euler step makes it)."""
    check_gamma(gamma)
    den, x, _, s = prepare("bdia", model, x, sigmas, extra_args, space, descending=True)
    if pair is None:
        pair = x + (s[1] - s[0]) * den.slope(x, s[0])
    elif pair.shape != x.shape:
        raise SolverError(f"bdia: the pair state has shape {tuple(pair.shape)}, expected {tuple(x.shape)}")
    up, cur = x, pair.to(x)  # the work dtype, on x's device
    notify(callback, 0, cur, s[1], den.last)
    for k in range(1, len(s) - 1):
        den.step = k
        d = den.slope(cur, s[k])
        nxt = g(gamma, s[k + 1], s[k - 1], space) * (up - (cur + (s[k - 1] - s[k]) * d)) + cur + (s[k + 1] - s[k]) * d
        up, cur = cur, check_finite(nxt, "bdia", k)
        notify(callback, k, cur, s[k + 1], den.last)
    return cur
