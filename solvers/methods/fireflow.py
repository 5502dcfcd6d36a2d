"""FireFlow: the midpoint step of the flow ODE with its first slope reused, about 1 model call a step.

Paper: Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing",
arXiv:2412.07517.

In the host's sigma, ``dx/dsigma = v(x, sigma)`` with ``v`` the slope (flow: the velocity;
EPS and v-prediction: ``eps``). A step of size ``h`` from ``s`` is the explicit midpoint step
whose first slope is the previous step's midpoint slope, reused:
``x_mid = x + (h / 2) u``, ``u' = v(x_mid, s + h / 2)``, ``x_next = x + h u'``, then ``u = u'``.
The first step has no previous midpoint: ``u = v(x, s_0)``, one call more. So N + 1 calls for
N steps, both ways (``h > 0`` inverts, ``h < 0`` samples); the reuse keeps the midpoint rule's
second order where the velocity changes slowly along the path, as on rectified flows. An
inversion starts at sigma 0, where the host's slope is 0 / 0: that one slope is read at
FlipSigmas' 1e-4 (``core.FLIPPED_ZERO``).
"""

from ..core import FLIPPED_ZERO, prepare, run_steps, single
from ..record import Inversion


class Midpoints:
    """The reused slope: the last midpoint's, or the first state's before any step."""

    def __init__(self, den):
        self.den, self.u = den, None

    def step(self, x, s, h):
        if self.u is None:
            self.u = self.den.slope(x, max(s, FLIPPED_ZERO))
        self.u = self.den.slope(x + (h / 2) * self.u, s + h / 2)
        return x + h * self.u


def invert_fireflow(model, x, sigmas, extra_args=None, callback=None, *, space, keep_trajectory=False):
    den, x, sig, s = prepare("fireflow", model, x, sigmas, extra_args, space)
    mid = Midpoints(den)
    x, traj = run_steps("fireflow", den, x, s, lambda i, x, sa, sb: mid.step(x, sa, sb - sa), callback,
                        keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


def sample_fireflow(model, x, sigmas, extra_args=None, callback=None, *, space, pair=None):
    single("fireflow", pair)
    den, x, _, s = prepare("fireflow", model, x, sigmas, extra_args, space, descending=True)
    mid = Midpoints(den)
    x, _ = run_steps("fireflow", den, x, s, lambda i, x, sb, sa: mid.step(x, sb, sa - sb), callback, False)
    return x
