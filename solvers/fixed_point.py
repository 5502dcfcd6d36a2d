"""Fixed-point inversion: iterate ``x <- F(x)`` (the framing of the AIDI paper).

``F(x) = x_a + (sb - sa) d(x, sb)`` is the map whose fixed point inverts one Euler/DDIM
step exactly (see ``implicit``). Started from the DDIM guess, the first iterate is DDIM
inversion itself; each further iterate costs 1 NFE. Plain iteration converges only where
``F`` contracts, which it need not do (at 10 uniform flow steps the first step out of
sigma = 0 does not): steps stopped at the cap are listed in ``Inversion.unconverged``.
"""

from .implicit import invert_implicit


def picard(xs, gs, rs):
    return gs[-1]


def invert_fixed_point(model, x, sigmas, extra_args=None, callback=None, space="eps", iterations=5,
                       tol=1e-4, guess="ddim", keep_trajectory=False):
    return invert_implicit("fixed_point", picard, 1, model, x, sigmas, extra_args, callback,
                           space, iterations, tol, guess, keep_trajectory)
