"""Stochastic editing in the edit-friendly noise space.

A stochastic (ancestral) sampler steps ``x_a = mu(x_b) + s z`` (``editing.ancestral``). Given
an inverted trajectory ``x*_0 .. x*_N`` and the source prompt's denoiser, the offsets
``e_i = x*_{i-1} - mu(x*_i)`` make the replay ``x_{i-1} = mu(x_i) + e_i`` return every
``x*_i`` exactly, whatever method made the trajectory. ``z_i = e_i / s_i`` is the noise the
sampler "used"; an edit replays with the target prompt's denoiser and, inside the edit
mask, replaces ``z_i`` by fresh seeded noise: ``z'_i = M * fresh + (1 - M) * z_i``. Steps
with ``s_i = 0`` (the last one, or every one at eta = 0) keep their offset as it is.
Memory: one latent per step (O(steps x latent)).
"""

from .core import Denoiser, SolverError, check_finite, check_latent, check_schedule, notify, work_dtype
from .editing import ancestral_mean, check_eta


def noise_maps(model, trajectory, sigmas, extra_args=None, callback=None, space="eps", eta=1.0):
    """Per sampling step (from the top down) the pair (offset e_i, noise scale s_i)."""
    check_eta(eta)
    if trajectory is None or len(trajectory) != len(sigmas):
        raise SolverError("edit-friendly noise needs the inversion's trajectory (one latent per sigma); "
                          "invert with keep_trajectory")
    traj = [check_latent(t, "trajectory").to(work_dtype(t.dtype)) for t in trajectory]
    s = [float(v) for v in check_schedule(sigmas, traj[0])]
    den = Denoiser(model, extra_args, "edit_friendly")
    maps = []
    for k, i in enumerate(range(len(s) - 1, 0, -1)):
        den.step = k
        mu, up = ancestral_mean(traj[i], den(traj[i], s[i]), s[i], s[i - 1], eta, space)
        maps.append((check_finite(traj[i - 1] - mu, "edit_friendly", k), up))
        notify(callback, k, traj[i - 1], s[i - 1], den.last)
    return maps, den.nfe


def replay(model, x, sigmas, maps, extra_args=None, callback=None, space="eps", eta=1.0, fresh=None, mask=None):
    """Sample down ``sigmas`` (descending) reusing ``maps``; ``fresh(k)`` gives step k's new noise.

    ``x`` and ``fresh(k)`` may hold several copies of the batch the maps were made for
    (samples stacked along the batch); the maps and ``mask`` are repeated to match.
    """
    den = Denoiser(model, extra_args, "edit_friendly")
    x = check_latent(x).to(work_dtype(x.dtype))
    s = [float(v) for v in check_schedule(sigmas, x, descending=True)]
    if len(maps) != len(s) - 1:
        raise SolverError(f"edit_friendly: {len(maps)} noise maps for {len(s) - 1} steps")
    reps = x.shape[0] // maps[0][0].shape[0]
    m = None if mask is None else mask.to(x).repeat(reps, *[1] * (x.ndim - 1))
    for k, (e, up) in enumerate(maps):
        den.step = k
        mu, _ = ancestral_mean(x, den(x, s[k]), s[k], s[k + 1], eta, space)
        e = e.to(x).repeat(reps, *[1] * (x.ndim - 1))
        if up > 0 and fresh is not None and m is not None:
            z = e / up
            e = up * (z + m * (fresh(k).to(x) - z))
        x = check_finite(mu + e, "edit_friendly", k)
        notify(callback, k, x, s[k + 1], den.last)
    return x
