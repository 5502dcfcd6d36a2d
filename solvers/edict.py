"""EDICT: exact inversion with two coupled states, 2 NFE per step.

A sampling step from ``sb`` to ``sa`` (``h = sa - sb``) updates each state with the slope
of the other, then mixes them with ``p``:
``x' = x + h d(y, sb)``, ``y' = y + h d(x', sb)``,
``x'' = p x' + (1 - p) y'``, ``y'' = p y' + (1 - p) x''``.
Every operation is invertible in closed form, so inversion undoes them in reverse order.
Both states start at the clean latent; the inverted state is the pair ``(x_N, y_N)`` and
the reconstruction is the ``x`` chain. Mixing in sigma coordinates equals mixing in the
paper's signal-preserving ones, since both states sit at the same sigma. Paper default
p = 0.93; rounding is amplified by ``1 / p`` per step.
"""

from .core import Inversion, SolverError, check_finite, notify, prepare


def check_p(p):
    if not 0 < p <= 1:
        raise SolverError(f"edict: p must be in (0, 1], got {p}")


def invert_edict(model, x, sigmas, extra_args=None, callback=None, space="eps", p=0.93, keep_trajectory=False):
    check_p(p)
    den, x, sig, s = prepare("edict", model, x, sigmas, extra_args, space)
    y = x
    traj = [x] if keep_trajectory else None
    for i in range(len(s) - 1):
        den.step = i
        sa, sb = s[i], s[i + 1]
        y_mid = (y - (1 - p) * x) / p
        x_mid = (x - (1 - p) * y_mid) / p
        y = y_mid - (sa - sb) * den.slope(x_mid, sb)
        x = check_finite(x_mid - (sa - sb) * den.slope(y, sb), "edict", i)
        if traj is not None:
            traj.append(x)
        notify(callback, i, x, sb, den.last)
    return Inversion(latent=x, pair=y, sigmas=sig, method="edict", space=space, nfe=den.nfe, sampler="edict",
                     settings={"p": float(p)}, trajectory=traj)


def sample_edict(model, x, sigmas, extra_args=None, callback=None, space="eps", pair=None, p=0.93):
    """Sample down a descending schedule; ``pair`` is the twin state (else a copy of ``x``)."""
    check_p(p)
    den, x, _, s = prepare("edict", model, x, sigmas, extra_args, space, descending=True)
    if pair is not None and pair.shape != x.shape:
        raise SolverError(f"edict: the pair state has shape {tuple(pair.shape)}, expected {tuple(x.shape)}")
    y = x if pair is None else pair.to(x.dtype)
    for k in range(len(s) - 1):
        den.step = k
        sb, sa = s[k], s[k + 1]
        x_mid = x + (sa - sb) * den.slope(y, sb)
        y_mid = y + (sa - sb) * den.slope(x_mid, sb)
        x = check_finite(p * x_mid + (1 - p) * y_mid, "edict", k)
        y = p * y_mid + (1 - p) * x
        notify(callback, k, x, sa, den.last)
    return x
