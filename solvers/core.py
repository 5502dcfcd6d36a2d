"""Shared pieces of every solver: the denoiser contract, schedules, the result type.

Coordinates are the host's: a state ``x`` at noise level ``sigma`` and a denoiser
``model(x, sigma, **extra_args) -> x0_hat`` with guidance already applied. The slope is
``d(x, sigma) = (x - model(x, sigma)) / sigma`` and an Euler step in sigma is DDIM
(EPS / v-prediction, ``x = x0 + sigma * eps``) or rectified-flow Euler (flow,
``x = (1 - sigma) * x0 + sigma * eps``). The two spaces differ only in the
signal-preserving rescaling ``vp_scale`` used by DDIM-style guesses, EasyInv and BDIA.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

EPS = "eps"
FLOW = "flow"
SPACES = (EPS, FLOW)
# ComfyUI's FlipSigmas replaces a reversed schedule's leading 0 by this.
FLIPPED_ZERO = 1e-4
# The implicit loop splits a stalled step at most this many times over: into up to 2**DEPTH steps.
DEPTH = 4

Callback = Optional[Callable[[dict], None]]


class SolverError(ValueError):
    """Bad input to a solver, raised before the model is evaluated."""


class NonFiniteError(FloatingPointError):
    """The denoiser (or the method's arithmetic) produced NaN or inf."""


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least, whatever the model's dtype; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def check_space(space: str) -> str:
    if space not in SPACES:
        raise SolverError(f"space must be one of {SPACES}, got {space!r}")
    return space


def check_schedule(sigmas, x: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """A schedule with at least one step, as a tensor on x's device.

    Inversion schedules ascend strictly from 0; sampling schedules descend strictly.
    """
    sigmas = torch.as_tensor(sigmas, dtype=work_dtype(x.dtype), device=x.device).flatten()
    if sigmas.numel() < 2:
        raise SolverError(f"the schedule needs at least 1 step (2 sigmas), got {sigmas.numel()} sigma(s)")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise SolverError("the schedule holds negative or non-finite sigmas")
    if descending:
        if not (sigmas[1:] < sigmas[:-1]).all():
            raise SolverError("a sampling schedule must be strictly descending")
        return sigmas
    if sigmas[0] != 0:
        raise SolverError(f"an inversion schedule starts at sigma = 0, got {sigmas[0].item():g}")
    if not (sigmas[1:] > sigmas[:-1]).all():
        raise SolverError("an inversion schedule must be strictly ascending (reverse a sampling schedule first)")
    return sigmas


def check_latent(x: torch.Tensor, name: str = "latent") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise SolverError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim not in (4, 5):
        raise SolverError(f"{name} must be 4D (B,C,H,W) or 5D (B,C,T,H,W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise SolverError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if not finite(x):
        raise SolverError(f"{name} holds non-finite values")
    return x


def vp_scale(sigma, space: str) -> float:
    """Factor that takes a state at ``sigma`` to signal-preserving coordinates (z = x * k)."""
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2) if space == EPS else 1.0


class Denoiser:
    """The host's denoiser, counted, checked for non-finite output, read in float32."""

    def __init__(self, model, extra_args: Optional[dict], method: str):
        self.model = model
        self.extra_args = extra_args or {}
        self.method = method
        self.nfe = 0
        self.step = 0
        self.last = None  # the latest x0_hat, for previews

    def __call__(self, x: torch.Tensor, sigma, check: bool = True) -> torch.Tensor:
        """``check=False``: the caller checks the output's finiteness itself (``check_output``)."""
        s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        self.last = None  # not held while the model runs: one latent less at the peak
        out = self.model(x, s, **self.extra_args)
        self.nfe += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise SolverError(
                f"{self.method}: the denoiser returned {getattr(out, 'shape', type(out))}, "
                f"expected a tensor of the latent's shape {tuple(x.shape)}"
            )
        # Solvers never differentiate through the model: a host that runs it with autograd on
        # (a sampler called outside inference mode) must not drag its graph into their buffers.
        out = out.detach().to(x.dtype)
        self.sigma, self.last = float(sigma), out
        return self.check_output(out) if check else out

    def check_output(self, out: torch.Tensor) -> torch.Tensor:
        if not finite(out):
            raise NonFiniteError(
                f"{self.method}: the denoiser returned non-finite values at step {self.step + 1} "
                f"(sigma = {self.sigma:.6g})"
            )
        return out

    def slope(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return (x - self(x, sigma)) / float(sigma)


def finite(t: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum has no NaN or inf term, and one reduction costs
    a fraction of the elementwise test (which allocates a full-size mask); that runs only when the
    sum is not finite (a NaN or inf, or finite values whose sum overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(x: torch.Tensor, method: str, step: int) -> torch.Tensor:
    if not finite(x):
        raise NonFiniteError(f"{method}: the state became non-finite at step {step + 1}")
    return x


def notify(callback: Callback, i: int, x: torch.Tensor, sigma, denoised=None, **more) -> None:
    """The host's progress report of step ``i``; ``more``: what a solver adds (an editor: its region's
    ``mask`` at the step, None for the whole image)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised, **more})


def single(method: str, pair) -> None:
    """A single-state sampler's ``pair``: None, since one given would be ignored."""
    if pair is not None:
        raise SolverError(f"{method}: this sampler resumes from one state, but a pair state was given, which it "
                          "would ignore; pass pair=None, or resume a two-state inversion with its own sampler")


def prepare(method: str, model, x, sigmas, extra_args, space, descending=False):
    """Checks shared by every solver; returns (denoiser, x in work dtype, sigmas tensor, sigmas list)."""
    check_space(space)
    x = check_latent(x).to(work_dtype(x.dtype))
    sig = check_schedule(sigmas, x, descending)
    return Denoiser(model, extra_args, method), x, sig, [float(v) for v in sig]


def run_steps(method: str, den: Denoiser, x: torch.Tensor, s: list, step, callback, keep_trajectory):
    """Walk the schedule with ``step(i, x, sa, sb) -> x_b``; returns (x_N, trajectory or None)."""
    traj = [x] if keep_trajectory else None
    for i in range(len(s) - 1):
        den.step = i
        x = check_finite(step(i, x, s[i], s[i + 1]), method, i)
        if traj is not None:
            traj.append(x)
        notify(callback, i, x, s[i + 1], den.last)
    return x, traj
