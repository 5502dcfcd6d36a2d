"""ReNoise: a fixed number of renoising iterations per step, their noise estimates averaged.

Paper: Garibi et al., "ReNoise: Real Image Inversion Through Iterative Noising", ECCV
2024, arXiv:2403.14602 (official code: garibida/ReNoise-Inversion).

Counting. A step makes ``iterations`` model calls; the paper's ``num_renoise_steps = K``
is ``iterations = K + 1`` (the first call is the DDIM inversion step, then K renoising
calls). Call ``k`` (0-based) evaluates the slope ``d_k = d(x^(k), sb)`` with ``x^(0)`` the
DDIM guess point and ``x^(k+1) = x_a + (sb - sa) d_k``; the step ends at
``x_b = x_a + (sb - sa) * mean(d_k for lo <= k < hi)``, or at the last ``x^(k+1)`` when the
window is empty (``lo = hi``). One call with window (0, 1) is DDIM inversion. A window must
lie within the calls of the steps that use it (``hi`` at most their calls), checked before any
model call: the official code cuts it to the calls silently, so its SD example (2 calls,
windows (8, 10) and (0, 5)) is here windows (2, 2) and (0, 2).

Low-noise steps. Every step whose upper level ``sb`` lies in the low-noise part of the
model's training range (``first_until``, a fraction of its timesteps: the official code's
``t < 250`` of 1000) uses ``first_window`` and makes at most ``first_iterations`` calls
(official: at most 5 renoising steps, so 6 calls). In sigma: EPS / v-prediction models
read the fraction on Stable Diffusion's discrete schedule (scaled-linear betas 0.00085 to
0.012, 1000 steps: ``t < 250`` is ``sigma < 0.6958``); flow models, whose timestep is
``1000 sigma``, read it as ``sigma < first_until``.

Noise regularisation (``reg_steps > 0``, the official default 4; for editability, not
reconstruction). From call ``lo`` of the step's window on, the noise estimate that takes
the next iterate, and the window's mean before the last update, take ``reg_steps`` rounds
of gradient descent on two losses of the noise alone (the model is not differentiated):

- a KL term, weight ``lambda_kl``: per channel and 4x4 patch, ``|log((v1 + e)/(v0 + e)) +
  (v0 + (m0 - m1)^2)/(v1 + e) - 1|`` summed (``m, v`` the patch's mean and unbiased
  variance, ``e = 1e-6``), against the noise the model predicts for the clean latent
  forward-noised to ``sb`` with a seeded draw; its gradient clipped to [-100, 100];
- an auto-correlation term, weight ``lambda_ac``, in 5 sub-steps each of a fifth of the
  gradient: per channel, on the map and its 2x average-pooled copies down to 8 pixels,
  ``mean(n * roll(n, r, H))^2 + mean(n * roll(n, r, W))^2`` with a seeded ``r`` drawn from
  ``[0, H / 2)`` per channel and level.

The noise is the model's noise estimate, the slope, in the host's sigma space of EPS and
v-prediction models (``x = x0 + sigma eps``: v-prediction's denoised output gives the same
``eps``). Flow models are refused with it: their noise ``eps = d + D`` near sigma 0 drives
the regularised iterate off the model (non-finite within the first step on the shift-3
schedule), and the paper states the losses for EPS noise only.

Where the pack departs from the official code, on purpose: the KL runs over every
channel (the official code groups 4 channels and drops the rest); the reference noise
costs one model call per step that regularises (the official code evaluates it in every
step, batched with the first call); the reference is always the forward-noised latent
(the official SD1.x/2.x pipelines replace forward noising by the identity, an artefact of
their img2img set-up); the official noise correction (``perform_noise_correction``) edits
the stored noise of its ancestral Euler scheduler and has no counterpart for the
deterministic samplers that resume here.
"""

from __future__ import annotations

import torch

from ..core import EPS, SolverError, prepare, run_steps, vp_scale
from ..record import Inversion

AC_ROLLS = 5        # the official auto-correlation sub-steps per regularisation round
KL_PATCH = 4        # patch side of the KL term
KL_EPS = 1e-6
KL_CLIP = 100.0
TRAIN_STEPS = 1000  # SD's training timesteps, on which ``first_until`` is read


def sd_sigma(t: float) -> float:
    """Sigma of SD's discrete schedule at timestep ``t`` (0..999), log-linear between integers."""
    b = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - b, 0)
    s = ((1 - a) / a).sqrt()
    t = min(max(float(t), 0.0), TRAIN_STEPS - 1.0)
    lo = int(t)
    hi = min(lo + 1, TRAIN_STEPS - 1)
    w = t - lo
    return float(torch.exp((1 - w) * s[lo].log() + w * s[hi].log()))


def low_noise_sigma(first_until: float, space: str) -> float:
    """Below this sigma a step counts as low-noise (the official ``t < 250``)."""
    return sd_sigma(first_until * TRAIN_STEPS) if space == EPS else float(first_until)


def patch_kl(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Summed per-channel KL-style distance between 4x4 patch statistics of ``e`` and ``ref``."""
    def stats(t):
        t = t.flatten(1, -3)
        h, w = t.shape[-2] // KL_PATCH * KL_PATCH, t.shape[-1] // KL_PATCH * KL_PATCH
        t = t[..., :h, :w].unflatten(-1, (w // KL_PATCH, KL_PATCH)).unflatten(-3, (h // KL_PATCH, KL_PATCH))
        t = t.transpose(-3, -2).flatten(-2)  # (B, C, H/4, W/4, 16)
        return t.mean(-1), t.var(-1)
    m0, v0 = stats(e)
    m1, v1 = stats(ref)
    kl = torch.log((v1 + KL_EPS) / (v0 + KL_EPS)) + (v0 + (m0 - m1) ** 2) / (v1 + KL_EPS) - 1
    return kl.abs().sum()


def pool2(n: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (as ``avg_pool2d(n, 2)``; written out, as that is slow in float64 on CPU)."""
    h, w = n.shape[-2] // 2, n.shape[-1] // 2
    return n[..., :2 * h, :2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2)).mean((-1, -3))


def autocorr(e: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The auto-correlation loss with seeded rolls (one per channel and level, shared by the batch)."""
    e = e.flatten(1, -3)
    loss = e.new_zeros(())
    for c in range(e.shape[1]):
        n = e[:, c:c + 1]
        while True:
            r = int(torch.randint(0, max(n.shape[-2] // 2, 1), (1,), generator=gen))
            loss = loss + (n * torch.roll(n, r, -2)).mean((1, 2, 3)).pow(2).sum()
            loss = loss + (n * torch.roll(n, r, -1)).mean((1, 2, 3)).pow(2).sum()
            if n.shape[-2] <= 8:
                break
            n = pool2(n)
    return loss


def regularise(e, ref, lambda_ac, lambda_kl, rounds, gen):
    """``rounds`` of gradient steps on the KL and auto-correlation losses of ``e`` (the noise only)."""
    shape = e.shape
    # The host samples under inference mode; the losses need autograd on fresh tensors.
    with torch.inference_mode(False), torch.enable_grad():
        e = e.clone()
        ref = None if ref is None else ref.clone()
        for _ in range(int(rounds)):
            if lambda_kl > 0:
                v = e.detach().requires_grad_(True)
                g, = torch.autograd.grad(patch_kl(v, ref), v)
                e = e - lambda_kl * g.clamp(-KL_CLIP, KL_CLIP)
            if lambda_ac > 0:
                for _ in range(AC_ROLLS):
                    v = e.detach().requires_grad_(True)
                    g, = torch.autograd.grad(autocorr(v, gen), v)
                    e = e - lambda_ac * (g / AC_ROLLS)
        return e.detach().reshape(shape)


class Reference:
    """A step's reference noise for the KL term: the model's noise on the clean latent forward-noised
    to ``sb``, one model call, made on first use (None without the KL term)."""

    def __init__(self, den, x0, noise, sb, wanted):
        self.den, self.x0, self.e, self.sb, self.wanted, self.value, self.made = den, x0, noise, sb, wanted, None, False

    def noise(self):
        if not self.made:
            self.value = self.den.slope(self.x0 + self.sb * self.e, self.sb) if self.wanted else None
            self.made = True
        return self.value


def check_settings(space, iterations, window, first_window, first_iterations, first_until, reg_steps, lambda_ac,
                   lambda_kl):
    for name, v in (("iterations", iterations), ("first_iterations", first_iterations)):
        if int(v) < 1:
            raise SolverError(f"renoise: {name} must be >= 1, got {v}")
    for name, w in (("window", window), ("first_window", first_window)):
        if len(w) != 2 or not 0 <= int(w[0]) <= int(w[1]):
            raise SolverError(f"renoise: {name} must be (lo, hi) with 0 <= lo <= hi, got {w}")
    if not 0 <= first_until <= 1:
        raise SolverError(f"renoise: first_until must be in [0, 1], got {first_until}")
    if int(reg_steps) < 0 or not lambda_ac >= 0 or not lambda_kl >= 0:
        raise SolverError(f"renoise: reg_steps, lambda_ac and lambda_kl must be >= 0, got "
                          f"{reg_steps}, {lambda_ac}, {lambda_kl}")
    if space != EPS and int(reg_steps) > 0 and (lambda_ac > 0 or lambda_kl > 0):
        raise SolverError("renoise: the noise regularisation (reg_steps > 0) is written for the noise of EPS and "
                          "v-prediction models; on a flow model set reg_steps to 0")


def check_windows(s, low, iterations, window, first_window, first_iterations):
    """Each window within the calls of the steps of ``s`` that use it: one past them would be cut
    short or dropped, so the step would not average what was asked."""
    fewest = min(int(first_iterations), int(iterations))
    for name, w, calls, used, why, fix in (
            ("window", window, int(iterations), any(sb >= low for sb in s[1:]), f"iterations {iterations} makes",
             "iterations"),
            ("first_window", first_window, fewest, any(sb < low for sb in s[1:]),
             f"the low-noise steps make (the fewer of iterations {iterations} and first_iterations "
             f"{first_iterations})", "iterations and first_iterations")):
        lo, hi = int(w[0]), int(w[1])
        if used and hi > calls:
            raise SolverError(f"renoise: {name} ({lo}, {hi}) averages calls {lo} to {hi - 1} of a step, but {why} "
                              f"{calls} calls a step: raise {fix} to at least {hi}, or give a {name} within "
                              f"(0, {calls}) (from = to averages none: the step is the last call's)")


def invert_renoise(model, x, sigmas, extra_args=None, callback=None, *, space, iterations, window, first_window,
                   first_iterations, first_until, reg_steps, lambda_ac, lambda_kl, reg_seed, keep_trajectory=False):
    check_settings(space, iterations, window, first_window, first_iterations, first_until, reg_steps, lambda_ac,
                   lambda_kl)
    den, x, sig, s = prepare("renoise", model, x, sigmas, extra_args, space)
    low = low_noise_sigma(first_until, space)
    check_windows(s, low, iterations, window, first_window, first_iterations)
    reg = int(reg_steps) > 0 and (lambda_ac > 0 or lambda_kl > 0)
    gen = torch.Generator().manual_seed(int(reg_seed))
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) if reg else None
    x0 = x

    def step(i, x_a, sa, sb):
        h = sb - sa
        first = sb < low
        lo, hi = (int(v) for v in (first_window if first else window))
        calls = min(int(first_iterations), int(iterations)) if first else int(iterations)
        ref = Reference(den, x0, noise, sb, lambda_kl > 0)

        def regular(d):  # EPS noise only (check_settings)
            return regularise(d, ref.noise(), lambda_ac, lambda_kl, reg_steps, gen)

        xk, avg, n = x_a * (vp_scale(sa, space) / vp_scale(sb, space)), None, 0  # DDIM's point
        for k in range(calls):
            d = den.slope(xk, sb)
            if lo <= k < hi:
                avg = d if avg is None else n * avg / (n + 1) + d / (n + 1)  # the official running mean and rounding
                n += 1
            if reg and k >= lo:
                d = regular(d)
            xk = x_a + h * d
        if avg is None:
            return xk
        d = regular(avg) if reg else avg
        return x_a + h * d

    x, traj = run_steps("renoise", den, x, s, step, callback, keep_trajectory)
    return Inversion(latent=x, sigmas=sig, space=space, nfe=den.nfe, trajectory=traj)
