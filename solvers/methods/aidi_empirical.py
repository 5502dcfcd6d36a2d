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


class AverageLastTwo:
    """One step's update: the mean of this F value and the last (the first iteration: F itself).
    Carried pairs are not used."""

    def __init__(self, carried):
        self.last = None

    def __call__(self, x, g, d, r):
        nxt = g if self.last is None else 0.5 * (g + self.last)
        self.last = g
        return nxt


def invert_aidi_empirical(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, tol, guess, loop,
                          keep_trajectory=False, depth=DEPTH):
    return invert_loop("aidi_empirical", AverageLastTwo, model, x, sigmas, extra_args, callback, space=space,
                       loop=loop, iterations=iterations, tol=tol, guess=guess, carry=0,
                       keep_trajectory=keep_trajectory, depth=depth)
