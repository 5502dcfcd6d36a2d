"""EasyInv: DDIM inversion that keeps pulling the state back towards its past.

Paper: Zhang et al., "EasyInv: Toward Fast and Better DDIM Inversion",
arXiv:2408.05159 (official code: potato-kitty/EasyInv).

Inside a window of steps (``start * N < i < end * N``, as fractions of the N steps) the
state is blended, in signal-preserving coordinates ``z = x * vp``, with the previous
blended state before the step: ``z~_i = eta * z_i + (1 - eta) * z~_{i-1}``; outside it
``z~_i = z_i``. The step is DDIM's, with the slope still taken at the unblended state:
``x_{i+1} = x~_i + (s_{i+1} - s_i) d(x_i carried to s_{i+1})``. No extra NFE; ``eta = 1``
is DDIM exactly. The official code's settings at 50 steps: SD1.x window (0.05, 0.25) with
eta = 0.5; SDXL (0.85, 0.95) with eta 0.5 to 0.8 (the pack's defaults: the registry).
"""

from ..core import SolverError, prepare, run_steps, vp_scale
from ..record import Inversion
from .ddim import ddim_slope


class Blend:
    """EasyInv's blend of a step's start with the previous blended start ``(x~_{i-1}, s_{i-1})``, inside
    the window ``lo < i < hi`` (in steps). Blending in sigma coordinates, with the past state carried
    to ``sa``, equals blending ``z = x * vp``; written this way eta = 1 leaves x bit-identical to DDIM."""

    def __init__(self, eta, lo, hi, space):
        self.eta, self.lo, self.hi, self.space, self.prev = eta, lo, hi, space, None

    def __call__(self, i, x, sa):
        tilde = x
        if self.lo < i < self.hi and self.prev is not None:
            px, ps = self.prev
            tilde = self.eta * x + (1 - self.eta) * px * (vp_scale(ps, self.space) / vp_scale(sa, self.space))
        self.prev = (tilde, sa)
        return tilde


def invert_easyinv(model, x, sigmas, extra_args=None, callback=None, *, space, eta, start, end,
                   keep_trajectory=False):
    if not 0 < eta <= 1:
        raise SolverError(f"easyinv: eta must be in (0, 1], got {eta}")
    if not 0 <= start <= end <= 1:
        raise SolverError(f"easyinv: the window needs 0 <= start <= end <= 1, got ({start}, {end})")
    den, x, sig, s = prepare("easyinv", model, x, sigmas, extra_args, space)
    blend = Blend(eta, start * (len(s) - 1), end * (len(s) - 1), space)

    def step(i, x, sa, sb):
        return blend(i, x, sa) + (sb - sa) * ddim_slope(den, x, sa, sb, space)

    x, traj = run_steps("easyinv", den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)
