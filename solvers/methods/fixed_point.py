"""Fixed-point inversion: iterate ``x <- F(x)`` (the framing of the AIDI paper).

Paper: Pan et al., "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", ICCV 2023,
arXiv:2309.04907.
``F(x) = x_a + (sb - sa) d(x, sb)`` is the map whose fixed point inverts one Euler/DDIM
step exactly (see ``implicit``). Started from the DDIM guess, the first iterate is DDIM
inversion itself; each further iterate costs 1 NFE. Plain iteration converges only where
``F`` contracts; where it does not, ``implicit`` splits the step until it does, within the
call budget, and reports the steps it could not solve in ``Inversion.unconverged``.
"""

from ..implicit import DEPTH, invert_loop


def picard(carried):
    return lambda x, g, d, r: g


def invert_fixed_point(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, tol, guess, loop,
                       keep_trajectory=False, depth=DEPTH):
    return invert_loop("fixed_point", picard, model, x, sigmas, extra_args, callback, space=space, loop=loop,
                       iterations=iterations, tol=tol, guess=guess, carry=0, keep_trajectory=keep_trajectory,
                       depth=depth)
