"""Deterministic Euler sampling in sigma: DDIM for EPS / v-prediction, rectified-flow Euler for flow.

DDIM: Song et al., "Denoising Diffusion Implicit Models", arXiv:2010.02502 (eta = 0,
which is Euler in sigma, Karras et al. arXiv:2206.00364); for flow, the Euler step of
rectified flow (Liu et al., arXiv:2209.03003).

``x_a = x_b + (sa - sb) d(x_b, sb)`` down a descending schedule. It is the sampler that
resumes every single-state inversion (DDIM, fixed-point, AIDI, ReNoise, EasyInv, naive
unsampling), so an inversion that solved its implicit steps exactly returns its input.
"""

from ..core import prepare, run_steps, single


def sample_euler(model, x, sigmas, extra_args=None, callback=None, *, space, pair=None):
    single("euler", pair)
    den, x, _, s = prepare("euler", model, x, sigmas, extra_args, space, descending=True)
    x, _ = run_steps("euler", den, x, s, lambda i, x, sb, sa: x + (sa - sb) * den.slope(x, sb), callback, False)
    return x
