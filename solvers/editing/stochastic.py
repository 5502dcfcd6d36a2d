"""Stochastic editing in the edit-friendly noise space, with blended guidance that keeps the rest.

The stochastic editing of Pan et al. (AIDI, ICCV 2023, arXiv 2309.04907: several sampled
edits, the best kept) built on the edit-friendly noise space of Huberman-Spiegelglas et al.,
"An Edit Friendly DDPM Noise Space" (arXiv 2304.06140). A stochastic (ancestral) sampler
steps ``x_a = mu(x_b) + s z`` (``noise.ancestral``). Given an inverted trajectory
``x*_0 .. x*_N`` and the source branch at ``w_inv``, the offsets
``e_i = x*_{i-1} - mu_s(x*_i)`` make the replay ``x_{i-1} = mu(x_i) + e_i`` return every
``x*_i`` exactly, whatever method made the trajectory. An edit replays with the target
branch under blended guidance (``W = w_inv + (w_edit - w_inv) M``, local blend with the
source predictions made for the maps) and, inside the mask, replaces the noise ``e_i / s_i``
by a fresh seeded draw: ``x_{i-1} = x*_{i-1} + (mu_t(x_i) - mu_s(x*_i)) + M (s_i z - e_i)``
(the same as ``mu_t + e_i + M (s_i z - e_i)``). Outside the mask (``M = 0``) the
target's mean, offset and state equal the source's, so every seed keeps the rest as the
source; steps with ``s_i = 0`` (the last, or all at eta = 0) keep their offset.

Each edit k draws its noise on the CPU from ``torch.Generator().manual_seed(seeds[k])``, so a
seed gives the same edit on every device. Scores: PSNR against the source outside the mask.
Memory: two latents per step (offsets and source predictions) plus the edits.
"""

import torch

from ..core import SolverError, check_finite, check_latent, check_schedule, notify, work_dtype
from .guidance import SOURCE, Branches
from .guidance import local_blend as local_blend_
from .masks import region
from .noise import ancestral_mean, check_eta, preservation


def noise_maps(br, traj, s, space, eta, callback=None):
    """Per sampling step (from the top down): (source mean mu_s(x*_i), noise scale s_i, source prediction D_s).

    The offset is ``e_i = x*_{i-1} - mu_s``; the replay adds ``mu_t - mu_s`` to ``x*_{i-1}``
    rather than ``e_i`` to ``mu_t``, so where the target follows the source it lands on the
    trajectory bit for bit."""
    maps = []
    for k, i in enumerate(range(len(s) - 1, 0, -1)):
        d = br.call(traj[i], s[i], SOURCE, br.w_inv).guided
        mu, up = ancestral_mean(traj[i], d, s[i], s[i - 1], eta, space)
        maps.append((check_finite(mu, "stochastic (the source replay)", k), up, d))
        notify(callback, k, traj[i - 1], s[i - 1], d)
    return maps


def edit_stochastic(model, trajectory, sigmas, mask, w_inv, w_edit, seeds, space="eps", eta=1.0, local_blend=True,
                    extra_args=None, callback=None):
    """``len(seeds)`` edits of the trajectory's source (index i at the ascending ``sigmas[i]``).

    Returns (edits (len(seeds) * B, ...), edit-major; scores (dB, per edit); edit-denoiser calls).
    ``callback`` sees the maps' steps, then each edit's steps (numbered on: ``steps * (1 + count)`` in all).
    Each edit runs as its own batch, so the model's extra arguments stay those of one batch.
    ``mask``: as ``edit_blended`` takes it; its window is every step, and each edit's steps grow
    a growing region anew.
    """
    check_eta(eta)
    seeds = [int(v) for v in seeds]
    if not seeds:
        raise SolverError("stochastic editing needs at least one seed")
    if trajectory is None or len(trajectory) != len(sigmas):
        raise SolverError("edit-friendly noise needs the inversion's trajectory (one latent per sigma); "
                          "invert with keep_trajectory")
    traj = [check_latent(t, "trajectory").to(work_dtype(t.dtype)) for t in trajectory]
    s = [float(v) for v in check_schedule(sigmas, traj[0])]
    br = Branches(model, region(mask, traj[0]), traj[0], w_inv, w_edit, s[::-1], local_blend=local_blend,
                  extra_args=extra_args)
    maps = noise_maps(br, traj, s, space, eta, callback)
    n = len(s) - 1
    ones = torch.ones(1, 1, *traj[0].shape[2:], dtype=traj[0].dtype, device=traj[0].device)
    edits, scores = [], []
    for j, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        x = traj[-1]
        for k, (mu_s, up, ds) in enumerate(maps):
            sb, sa = s[n - k], s[n - k - 1]
            dt, m = br.target(x, sb, k)
            m = ones if m is None else m.to(x)
            if local_blend:
                dt = local_blend_(ds, dt, m)
            mu, _ = ancestral_mean(x, dt, sb, sa, eta, space)
            x = traj[n - k - 1] + (mu - mu_s)
            if up > 0:
                z = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x)
                x = x + m * (up * z - (traj[n - k - 1] - mu_s))
            x = check_finite(x, "stochastic", k)
            notify(callback, n * (1 + j) + k, x, sa, dt, mask=br.shown)
        edits.append(x)
        scores.append(preservation(x, traj[0], ones if br.shown is None else br.shown.to(x)))
    return torch.cat(edits), torch.cat(scores), br.nfe
