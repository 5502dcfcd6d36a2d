"""ReNoise: a fixed number of fixed-point iterations per step, their slopes averaged.

Iteration k evaluates the slope ``d_k = d(x^(k), sb)`` with ``x^(0)`` the DDIM guess point
and ``x^(k+1) = x_a + (sb - sa) d_k``; after ``iterations`` evaluations the step is
``x_b = x_a + (sb - sa) * mean(d_k for k in [lo, hi))`` (0-based, clipped to the
iterations done; an empty window takes the last slope). The first step (nearest the
clean image) uses its own window. Paper defaults: SD-class models, 50 steps, 1 iteration;
SDXL-Turbo, 4 steps, 9 iterations, window (8, 10), first window (0, 5).
One iteration with any window is DDIM inversion.
"""

from .core import Inversion, SolverError, prepare, run_steps
from .implicit import guess_point


def invert_renoise(model, x, sigmas, extra_args=None, callback=None, space="eps", iterations=5,
                   window=(3, 5), first_window=(0, 5), keep_trajectory=False):
    if int(iterations) < 1:
        raise SolverError(f"renoise: iterations must be >= 1, got {iterations}")
    for name, w in (("window", window), ("first_window", first_window)):
        if len(w) != 2 or not 0 <= int(w[0]) <= int(w[1]):
            raise SolverError(f"renoise: {name} must be (lo, hi) with 0 <= lo <= hi, got {w}")
    den, x, sig, s = prepare("renoise", model, x, sigmas, extra_args, space)

    def step(i, x_a, sa, sb):
        lo, hi = first_window if i == 0 else window
        xk, kept = guess_point(x_a, sa, sb, space, []), []
        for k in range(int(iterations)):
            d = den.slope(xk, sb)
            if int(lo) <= k < int(hi):
                kept.append(d)
            xk = x_a + (sb - sa) * d
        return xk if not kept else x_a + (sb - sa) * (sum(kept) / len(kept))

    x, traj = run_steps("renoise", den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, method="renoise", space=space, nfe=den.nfe, sampler="euler",
                     settings={"iterations": int(iterations), "window": [int(v) for v in window],
                               "first_window": [int(v) for v in first_window]}, trajectory=traj)
