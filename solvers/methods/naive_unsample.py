"""Naive unsampling: explicit Euler uphill, what FlipSigmas + euler does in ComfyUI today.

No paper: it is the community practice (ComfyUI's FlipSigmas with the euler sampler, and
the Unsampler node of ComfyUI_Noise) of running the ordinary sampler on a reversed
schedule. ``x_b = x_a + (sb - sa) d(x_a, max(sa, 1e-4))``: the slope is taken at the
current point and the current sigma (FlipSigmas replaces the leading 0 by 1e-4). Kept as
the peer baseline the benchmark compares every other method against.
"""

from ..core import FLIPPED_ZERO, prepare, run_steps
from ..record import Inversion


def invert_naive_unsample(model, x, sigmas, extra_args=None, callback=None, *, space, keep_trajectory=False):
    den, x, sig, s = prepare("naive_unsample", model, x, sigmas, extra_args, space)
    x, traj = run_steps("naive_unsample", den, x, s,
                        lambda i, x, sa, sb: x + (sb - sa) * den.slope(x, max(sa, FLIPPED_ZERO)), callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)
