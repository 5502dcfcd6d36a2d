"""DDIM inversion: one model evaluation per step, the common baseline.

Paper: Song et al., "Denoising Diffusion Implicit Models", ICLR 2021,
arXiv:2010.02502 (deterministic sampling, eta = 0, run backwards).

``x_b = x_a + (sb - sa) d(x_a * sqrt(1 + sb^2) / sqrt(1 + sa^2), sb)`` (flow: the slope at
``x_a`` itself). It approximates the implicit inverse ``x_b = F(x_b)`` by evaluating the
slope at the previous state carried to ``sb`` in signal-preserving coordinates; the error
per step is first order in the step size.
"""

from ..core import prepare, run_steps, vp_scale
from ..record import Inversion


def ddim_slope(den, x_a, sa, sb, space):
    return den.slope(x_a * (vp_scale(sa, space) / vp_scale(sb, space)), sb)


def invert_ddim(model, x, sigmas, extra_args=None, callback=None, *, space, keep_trajectory=False):
    den, x, sig, s = prepare("ddim", model, x, sigmas, extra_args, space)
    x, traj = run_steps("ddim", den, x, s, lambda i, x, sa, sb: x + (sb - sa) * ddim_slope(den, x, sa, sb, space),
                        callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)
