"""RF-Solver: a second-order Taylor step of the flow ODE, the same rule to invert and to sample.

Paper: Wang et al., "Taming Rectified Flow for Inversion and Editing", arXiv:2411.04746. The
step is restated in the Taylor form of the Flux sampling loop the authors released (the
derivative from a half step), which is algebraically the explicit midpoint step.

In the host's sigma, ``dx/dsigma = v(x, sigma)`` with ``v = d(x, sigma)`` the slope (flow: the
velocity ``eps - x0``; EPS and v-prediction: ``eps``). A step of size ``h`` from ``s``:
``x_mid = x + (h / 2) v(x, s)``, ``v' = (v(x_mid, s + h / 2) - v(x, s)) / (h / 2)``,
``x_next = x + h v(x, s) + (h^2 / 2) v'``: 2 model calls per step, both ways (``h > 0`` inverts,
``h < 0`` samples). Inversion starts at sigma 0, where the host's slope ``(x - D) / sigma`` is
0 / 0: the first slope is read at FlipSigmas' 1e-4 (``core.FLIPPED_ZERO``), as ComfyUI's
flipped schedules do. Second-order accurate; not exact.
"""

from ..core import FLIPPED_ZERO, prepare, run_steps, single
from ..record import Inversion


def taylor_step(den, x, s, h):
    """One step of size ``h`` from sigma ``s`` (2 model calls)."""
    v = den.slope(x, max(s, FLIPPED_ZERO))
    v_mid = den.slope(x + (h / 2) * v, s + h / 2)
    return x + h * v + 0.5 * h ** 2 * ((v_mid - v) / (h / 2))


def invert_rf_solver(model, x, sigmas, extra_args=None, callback=None, *, space, keep_trajectory=False):
    den, x, sig, s = prepare("rf_solver", model, x, sigmas, extra_args, space)
    x, traj = run_steps("rf_solver", den, x, s, lambda i, x, sa, sb: taylor_step(den, x, sa, sb - sa), callback,
                        keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)


def sample_rf_solver(model, x, sigmas, extra_args=None, callback=None, *, space, pair=None):
    single("rf_solver", pair)
    den, x, _, s = prepare("rf_solver", model, x, sigmas, extra_args, space, descending=True)
    x, _ = run_steps("rf_solver", den, x, s, lambda i, x, sb, sa: taylor_step(den, x, sb, sa - sb), callback, False)
    return x
