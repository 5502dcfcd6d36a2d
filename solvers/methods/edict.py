"""EDICT: exact inversion with two coupled states, 2 NFE per step.

Paper: Wallace et al., "EDICT: Exact Diffusion Inversion via Coupled
Transformations", CVPR 2023, arXiv:2211.12446.

The paper writes a sampling step in DDIM's signal-preserving coordinates ``z`` (EPS:
``z = x / sqrt(1 + sigma^2)``; the model's input). There a DDIM step from ``sb`` down to
``sa`` with a noise estimate ``e`` is ``x -> x + (sa - sb) e`` once written in sigma
(``x = z / vp``), and the model sees its input as it stands. Sampling step ``k``
(``k = 0`` the first, noisiest step; ``h = sa - sb``; ``r = vp(sa) / vp(sb)``) updates
chain ``f`` first, then chain ``o``:

``X_f <- X_f + h d(X_o, sb)``, ``X_o <- X_o + h d(r X_f, sb)``,

then mixes with weight ``p``: ``X_0 <- p X_0 + (1 - p) X_1``, ``X_1 <- (1 - p) X_0 + p X_1``
(both at ``sa``, so mixing ``x`` equals mixing ``z``). The second update feeds the model the
already updated ``X_f``, which sits at ``sa``, at noise level ``sb``: in ``z`` that is ``z_f``
unchanged, in sigma coordinates ``r X_f``. With ``leapfrog`` (the paper's default) the order
alternates, ``(f, o) = (0, 1)`` at even ``k`` and ``(1, 0)`` at odd ``k``; without it chain 0
always goes first. Inversion step ``i`` undoes sampling step ``k = N - 1 - i`` in reverse
order (unmix chain 1, then chain 0; undo ``o``, then ``f``), so every operation is inverted
in closed form and the round trip is exact up to rounding, amplified by ``1 / p`` per step.

Flow models (no official code): the analogue keeps the two things the paper fixes, the
model's native prediction in the coupling and the model's own input coordinates. A flow
state is the model's input as it stands (``z = x``, ``r = 1``: the updated chain is fed
unchanged), and the coupling adds ``h`` times the velocity ``d = (x - D) / s`` of the
other chain: the rectified-flow Euler step, which is DDIM where base and input coincide.
A coupling through the noise estimate instead (``x_f <- (1 - sa) (x_f - sb e) / (1 - sb) +
sa e``) would be singular at ``sigma = 1``, where flow schedules start.

Both chains start at the clean latent; the inverted state is the pair ``(X_0, X_1)`` and
the reconstruction is chain 0. The official code's scheduler
(``set_alpha_to_one=False``) adds a first inversion step of zero length at alpha-bar
``alphas_cumprod[0]``; the host's schedules start at sigma 0 instead.
"""

from ..core import SolverError, check_finite, notify, prepare, vp_scale
from ..record import Inversion

ORDERS = ("leapfrog", "fixed")


def check_settings(p, order):
    # The registry's range (it checks it first); repeated for direct callers and the records' sampler.
    if not 0.5 <= p <= 1:
        raise SolverError(f"edict: p must be from 0.5 to 1.0, got {p}")
    if order not in ORDERS:
        raise SolverError(f"edict: order must be one of {ORDERS}, got {order!r}")


def first(k, order):
    """The chain sampling step ``k`` updates first (0 or 1)."""
    return k % 2 if order == "leapfrog" else 0


def invert_edict(model, x, sigmas, extra_args=None, callback=None, *, space, p, order, keep_trajectory=False):
    check_settings(p, order)
    den, x, sig, s = prepare("edict", model, x, sigmas, extra_args, space)
    n = len(s) - 1
    X = [x, x]
    traj = [x] if keep_trajectory else None
    for i in range(n):
        den.step = i
        sa, sb = s[i], s[i + 1]
        h, r = sa - sb, vp_scale(sa, space) / vp_scale(sb, space)
        X[1] = (X[1] - (1 - p) * X[0]) / p
        X[0] = (X[0] - (1 - p) * X[1]) / p
        f = first(n - 1 - i, order)
        o = 1 - f
        X[o] = X[o] - h * den.slope(X[f] * r, sb)
        X[f] = X[f] - h * den.slope(X[o], sb)
        check_finite(X[0], "edict", i)
        check_finite(X[1], "edict", i)
        if traj is not None:
            traj.append(X[0])
        notify(callback, i, X[0], sb, den.last)
    return Inversion(latent=X[0], pair=X[1], sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


def sample_edict(model, x, sigmas, extra_args=None, callback=None, *, space, pair=None, p, order):
    """Sample down a descending schedule; ``pair`` is chain 1 (else a copy of ``x``)."""
    check_settings(p, order)
    den, x, _, s = prepare("edict", model, x, sigmas, extra_args, space, descending=True)
    if pair is not None and pair.shape != x.shape:
        raise SolverError(f"edict: the pair state has shape {tuple(pair.shape)}, expected {tuple(x.shape)}")
    X = [x, x if pair is None else pair.to(x)]  # the work dtype, on x's device
    for k in range(len(s) - 1):
        den.step = k
        sb, sa = s[k], s[k + 1]
        h, r = sa - sb, vp_scale(sa, space) / vp_scale(sb, space)
        f = first(k, order)
        o = 1 - f
        X[f] = X[f] + h * den.slope(X[o], sb)
        X[o] = X[o] + h * den.slope(X[f] * r, sb)
        X[0] = p * X[0] + (1 - p) * X[1]
        X[1] = (1 - p) * X[0] + p * X[1]
        check_finite(X[0], "edict", k)
        notify(callback, k, X[0], sa, den.last)
    return X[0]
