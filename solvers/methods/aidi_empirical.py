"""AIDI-E: fixed-point inversion with empirical acceleration.

Paper: Pan et al., "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", ICCV 2023,
arXiv:2309.04907.
``x_{k+1} = (F(x_k) + F(x_{k-1})) / 2``; ``F(x_{k-1})`` is kept from the previous
iteration, so each iteration still costs 1 NFE. The first iteration is a plain
``x_1 = F(x_0)``. Averaging two consecutive outputs damps the oscillation that makes
plain iteration diverge where ``F`` has a negative slope. Budget, step splitting and the
DDIM fallback are ``implicit``'s.
"""

from ..implicit import DEPTH, invert_loop


def average_last_two(carried):
    last = []

    def step(x, g, d, r):
        nxt = g if not last else 0.5 * (g + last[0])
        last[:] = [g]
        return nxt
    return step


def invert_aidi_empirical(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, tol, guess, loop,
                          keep_trajectory=False, depth=DEPTH):
    return invert_loop("aidi_empirical", average_last_two, model, x, sigmas, extra_args, callback, space=space,
                       loop=loop, iterations=iterations, tol=tol, guess=guess, keep_trajectory=keep_trajectory,
                       depth=depth)
