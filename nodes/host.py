"""Glue between the host and the solvers: model space, schedules, guided denoising, LATENT records.

Everything that touches ComfyUI's sampling internals lives here so the node files stay
a schema and a few lines of execute.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..solvers import FLOW, EPS, NonFiniteError, SolverError

RECORD = "inversion"  # the LATENT key of the inversion record (nodes/record.py)

# Most specific first: V_PREDICTION and X0 are subclasses of EPS, IMG_TO_IMG_FLOW of CONST.
PREDICTIONS = ("IMG_TO_IMG_FLOW", "V_PREDICTION_DDPM", "V_PREDICTION_EDM", "EDM", "V_PREDICTION", "IMG_TO_IMG",
               "X0", "EPS", "CONST")
# Types a host may name whose state is not x = x0 + sigma * eps nor flow's x = (1 - sigma) x0 + sigma * eps.
REFUSED = {
    "IMG_TO_IMG_FLOW": "its denoised output is the raw network output and it maps the latent to 1 - latent, "
                       "so it is an image-to-image mapping, not flow-matching sampling",
    "V_PREDICTION_DDPM": "the network reads the sampler's state unscaled as the DDPM state sqrt(a) x0 + "
                         "sqrt(1 - a) eps (CogVideoX), not x = x0 + sigma * eps",
}


class NodeInputError(ValueError):
    """A node's input is unusable; the message names the node, the input and what was expected."""


def fail(node: str, what: str, message: str):
    raise NodeInputError(f"{node}: input '{what}': {message}")


def prediction(model) -> str:
    ms = model.get_model_object("model_sampling")
    for name in PREDICTIONS:
        cls = getattr(comfy.model_sampling, name, None)
        if cls is not None and isinstance(ms, cls):
            return name
    return type(ms).__name__


def space_of(model, node: str) -> str:
    """EPS, v-prediction and EDM models share x = x0 + sigma * eps; CONST is flow."""
    p = prediction(model)
    expected = "EPS, V_PREDICTION, EDM, X0 or flow (CONST) model sampling expected"
    if p in REFUSED:
        fail(node, "model", f"model sampling type {p} is not supported: {REFUSED[p]}; {expected}")
    if p == "CONST":
        return FLOW
    if p in PREDICTIONS:
        return EPS
    fail(node, "model", f"model sampling type {p} is not supported; {expected}")


def describe(model) -> dict:
    """What an inversion must match in the model that later resumes it."""
    return {"prediction": prediction(model), "latent_format": type(model.model.latent_format).__name__}


def check_latent(node: str, latent, model, what: str = "latent") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        fail(node, what, "expected a LATENT (a dict with a 'samples' tensor)")
    x = latent["samples"]
    fmt = model.model.latent_format
    # latent_dimensions: 2 for image models (B,C,H,W), 3 for video models (B,C,T,H,W).
    dims = getattr(fmt, "latent_dimensions", 2) + 2
    if x.ndim not in (4, 5):
        fail(node, what, f"expected 4D (B,C,H,W) or 5D (B,C,T,H,W) samples, got shape {tuple(x.shape)}")
    if dims not in (4, 5):
        fail(node, "model", f"its latents are {dims}D ({type(fmt).__name__}): only image (4D) and video (5D) "
                            "models are supported")
    if x.ndim != dims:
        kind = "an image model's" if dims == 4 else "a video model's"
        fail(node, what, f"has {x.ndim}D samples {tuple(x.shape)} but this is {kind} ({type(fmt).__name__}, "
                         f"{dims}D latents): encode the input with the VAE that belongs to this model")
    channels = getattr(fmt, "latent_channels", x.shape[1])
    if x.shape[1] != channels:
        fail(node, what, f"has {x.shape[1]} channels but this model's latents have {channels}: "
                         "encode the image with the VAE that belongs to this model")
    if not x.is_floating_point():
        fail(node, what, f"expected floating-point samples, got {x.dtype}")
    if x.numel() == 0:
        fail(node, what, f"is empty (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        fail(node, what, "holds NaN or inf values")
    return x


def no_noise_mask(node: str, latent: dict, what: str, why: str):
    """Refuse a LATENT's noise_mask where the node would otherwise ignore it."""
    if latent.get("noise_mask") is not None:
        fail(node, what, f"carries a noise_mask (from SetLatentNoiseMask or VAEEncodeForInpaint), which {node} "
                         f"does not use: {why}")


def check_conditioning(node: str, cond, what: str):
    ok = isinstance(cond, list) and len(cond) > 0 and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], torch.Tensor) and isinstance(c[1], dict)
        for c in cond)
    if not ok:
        fail(node, what, "expected a CONDITIONING (from a text encoder node)")
    return cond


def zero_out(cond):
    """A zeroed copy of a conditioning, as ConditioningZeroOut makes: the negative when none is given."""
    out = []
    for t, d in cond:
        d = dict(d)
        if isinstance(d.get("pooled_output"), torch.Tensor):
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(t), d])
    return out


def sigmas_for(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The host's sampling schedule (as KSampler builds it, denoise included), reversed for inversion."""
    ms = model.get_model_object("model_sampling")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sig = comfy.samplers.calculate_sigmas(ms, scheduler, total).cpu()[-(steps + 1):]
    return sig.flip(0).to(torch.float64)


def progress(model, steps: int):
    """A solver callback that advances the progress bar, shows previews and honours interrupts."""
    preview = latent_preview.prepare_callback(model, steps)

    def callback(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x0 = d.get("denoised")
        preview(d["i"], d["x"] if x0 is None else x0, d["x"], steps)
    return callback


class _Run(comfy.samplers.Sampler):
    """Runs ``job(denoiser, x, model_space)`` where the guider hands a sampler its denoiser.

    Going through ``CFGGuider.sample`` keeps the host's conditioning, batching of cond and
    uncond, patches and model loading, and skips KSAMPLER's noise scalings (which divide by
    ``1 - sigma`` for flow models). ``x`` arrives, and the job's tensors leave, in the
    model's space; ``process_latent_in/out`` convert them.
    """

    def __init__(self, job):
        self.job = job
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result, out = self.job(lambda x, s: model_wrap(x, s, **extra_args), latent_image, model_wrap.inner_model)
        return out


def negative_for(node: str, positive, negative, what: str = "positive"):
    """Checks the prompts; a missing negative becomes a zeroed positive."""
    check_conditioning(node, positive, what)
    if negative is None:
        return zero_out(positive)
    return check_conditioning(node, negative, "negative")


def run_guider(node: str, guider, samples: torch.Tensor, sigmas: torch.Tensor, job):
    """Run ``job`` under ``guider``; returns (job's result, its output latent in VAE scale).

    The one place solver errors get the node's name: callers let them through unchanged.
    """
    run = _Run(job)
    try:
        with torch.no_grad():
            out = guider.sample(torch.zeros_like(samples), samples, run, sigmas.to(torch.float32), disable_pbar=True,
                                seed=0)
    except (SolverError, NonFiniteError) as e:
        if str(e).startswith(f"{node}: "):
            raise
        raise type(e)(f"{node}: {e}") from e
    return run.result, out.to(comfy.model_management.intermediate_device())


def guided(node: str, model, positive, negative, cfg: float, samples: torch.Tensor, sigmas: torch.Tensor, job):
    """Run ``job`` under the host's CFG guider with these prompts."""
    negative = negative_for(node, positive, negative)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return run_guider(node, guider, samples, sigmas, job)


def to_vae(inner, t):
    """A model-space tensor, as a LATENT holds it, on the host's intermediate device."""
    if t is None:
        return None
    return inner.process_latent_out(t.to(torch.float32)).to(comfy.model_management.intermediate_device())


def to_model(inner, t, like):
    return None if t is None else inner.process_latent_in(t.to(like.device, like.dtype))


def resume(node: str, latent, model, what: str = "inverted"):
    """An inverted LATENT's samples and its ``record.Record``, checked against the model that resumes it."""
    from .record import Record  # record.py builds on this module

    rec = Record.read(node, latent, what, model)
    return latent["samples"], rec
