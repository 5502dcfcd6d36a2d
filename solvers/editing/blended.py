"""Blended guidance: strong guidance only inside the edit region, over any resuming sampler.

From Pan et al., "Effective Real Image Editing with Accelerated Iterative Diffusion
Inversion" (AIDI, ICCV 2023, arXiv 2309.04907), its blended guidance; the local blend is
prompt-to-prompt's (Hertz et al., arXiv 2208.01626). The inversion
runs at a low scale ``w_inv``; the edit samples a source branch (source prompt, ``w_inv``)
and a target branch (target prompt) side by side, the target at the per-pixel scale
``W = w_inv + (w_edit - w_inv) M`` during the mask's window (the first
``ceil(mask_steps * N)`` steps), ``w_inv`` after. With local blending the target takes the
source branch's prediction outside the mask, ``D_t <- M D_t + (1 - M) D_s``; every sampler
here updates each pixel linearly from its own state and prediction, so the target state
stays equal to the source branch where ``M = 0``, and the source branch is the
reconstruction.

Both branches go through the sampler as one batch ``[source; target]`` (with their pairs
for BDIA and EDICT), so this works with every resuming sampler: Euler (every single-state
method), BDIA and EDICT. Cost: 2 edit-denoiser calls per model call of the sampler
(1 without the source branch). Memory: two copies of the sampler's states.
"""

import torch

from ..core import NonFiniteError, SolverError, check_latent
from ..methods.euler import sample_euler
from .guidance import Branches
from .masks import region


def edit_blended(model, x, sigmas, mask, w_inv, w_edit, sampler=sample_euler, sampler_args=None, pair=None,
                 space="eps", mask_steps=1.0, local_blend=True, source=True, extra_args=None, callback=None):
    """Edit from the inverted ``x`` down the descending ``sigmas``; returns (edited, edit-denoiser calls).

    ``model`` follows the edit contract (``editing``); ``sampler(model, x, sigmas, extra_args,
    callback, space=, pair=, **sampler_args)`` is the one that resumes the inversion and
    ``pair`` its second state. ``source=False`` skips the source branch (only when not
    blending). ``mask``: a tensor (B or 1, 1, *spatial) in [0, 1], a ``masks.Region``, or None
    (the whole image). Progress and previews show the target branch, with the region's values
    (``"mask"``; None: the whole image).
    """
    x = check_latent(x, "inverted latent")
    reg = region(mask, x)
    two = bool(source or local_blend)
    b = x.shape[0]
    br = Branches(model, reg, x, w_inv, w_edit, sigmas, mask_steps, local_blend, extra_args)
    if pair is not None and pair.shape != x.shape:
        raise SolverError(f"the pair state has shape {tuple(pair.shape)}, expected {tuple(x.shape)}")

    def den(xx, s):
        return br.stacked(xx, s) if two else br.pair(None, xx, s)[1]

    def target(d):  # progress and previews show the target branch
        if callback is not None:
            den_ = d.get("denoised")
            callback(dict(d, x=d["x"][-b:], denoised=None if den_ is None else den_[-b:], mask=br.shown))

    start = torch.cat([x, x]) if two else x
    pairs = None if pair is None else (torch.cat([pair, pair]) if two else pair)
    try:
        out = sampler(den, start, sigmas, None, target, space=space, pair=pairs, **(sampler_args or {}))
    except NonFiniteError as e:  # the sampler names itself ("euler: ..."), but the run is this editor's
        head, _, rest = str(e).partition(": ")
        raise NonFiniteError(f"blended ({head} sampler): {rest}") from None
    return out[-b:], br.nfe
