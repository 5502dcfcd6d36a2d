"""DirectInversion: the source branch snapped onto the inverted trajectory, its offset given to the target.

From Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code"
(Direct Inversion, ICLR 2024, arXiv 2310.01506). An approximate inversion's trajectory
``x*_N .. x*_0`` is not what Euler sampling with the source prompt retraces; instead of
optimising embeddings to close the gap, each step puts the source branch back on the
trajectory and adds the same correction to the target branch:

``xs_{k+1} = x*_k + h d_s(x*_k)``, ``c_k = x*_{k+1} - xs_{k+1}``,
``xt_{k+1} = xt_k + h d_t(xt_k) + c_k``, with ``h = s_{k+1} - s_k`` (descending sigmas),

written here as ``xt_{k+1} = x*_{k+1} + (xt_k - x*_k) + h (d_t - d_s)``, so that where the
target follows the source (``target = source``, or outside a locally blended mask) it lands
on ``x*_{k+1}`` exactly and the edit returns the source bit for bit. The prediction of each
branch is blended guidance (``guidance.Branches``): a whole-image edit is ``mask = 1``.

It applies to single-state methods (DDIM, naive unsampling, fixed-point, AIDI, ReNoise,
EasyInv, RF-Solver, FireFlow): it needs their kept trajectory. It does not apply to BDIA and
EDICT: their samplers already retrace the inverted states exactly (the correction ``c_k`` is
float rounding), and their second state (BDIA's previous state, EDICT's twin chain) has no
trajectory to snap to, so ``edit_direct`` refuses a sampler that resumes from a pair.
Cost: the two branches' calls per step, as blended guidance; memory: the trajectory.
"""

from ..core import SolverError, check_finite, check_latent, check_schedule, notify, work_dtype
from ..registry import SAMPLERS
from .guidance import Branches
from .masks import region


def edit_direct(model, trajectory, sigmas, mask, w_inv, w_edit, space="eps", mask_steps=1.0, local_blend=True,
                extra_args=None, callback=None, sampler="euler"):
    """Edit along ``trajectory`` (index i at the ascending inversion ``sigmas[i]``); returns (edited, calls).
    ``sampler``: the name of the inversion's resuming sampler, which must resume from one state.
    ``mask``: as ``edit_blended`` takes it."""
    if sampler not in SAMPLERS or SAMPLERS[sampler].states != 1:
        raise SolverError(f"DirectInversion applies to single-state methods; {sampler} already "
                          "samples back exactly along its inverted states and its second state has no trajectory "
                          "to snap to: edit it without DirectInversion")
    if trajectory is None or len(trajectory) != len(sigmas):
        raise SolverError("DirectInversion needs the inversion's trajectory (one latent per sigma); invert with "
                          "keep_trajectory")
    ref = [check_latent(t, "trajectory").to(work_dtype(t.dtype)) for t in reversed(list(trajectory))]
    s = [float(v) for v in check_schedule(sigmas, ref[0])][::-1]
    br = Branches(model, region(mask, ref[0]), ref[0], w_inv, w_edit, s, mask_steps, local_blend, extra_args)
    xt = ref[0]
    for k in range(len(s) - 1):
        sb, sa = s[k], s[k + 1]
        ds, dt = br.pair(ref[k], xt, sb, k)
        xt = check_finite(ref[k + 1] + (xt - ref[k]) + (sa - sb) * ((xt - dt) - (ref[k] - ds)) / sb, "direct", k)
        notify(callback, k, xt, sa, dt, mask=br.shown)
    return xt, br.nfe
