"""Deterministic Euler sampling in sigma: DDIM for EPS / v-prediction, rectified-flow Euler for flow.

``x_a = x_b + (sa - sb) d(x_b, sb)`` down a descending schedule. It is the sampler that
resumes every single-state inversion (DDIM, fixed-point, AIDI, ReNoise, EasyInv, naive
unsampling), so an inversion that solved its implicit steps exactly returns its input.
"""

from .core import prepare, run_steps


def sample_euler(model, x, sigmas, extra_args=None, callback=None, space="eps", pair=None):
    den, x, _, s = prepare("euler", model, x, sigmas, extra_args, space, descending=True)
    x, _ = run_steps("euler", den, x, s, lambda i, x, sb, sa: x + (sa - sb) * den.slope(x, sb), callback, False)
    return x
