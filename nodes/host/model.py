"""What the pack reads off a host model: its space, its identity, and the latents it takes."""

from __future__ import annotations

import comfy.model_sampling
import torch

from ...solvers import EPS, FLOW
from .inputs import fail

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


def sigma_max(model) -> float:
    return float(model.get_model_object("model_sampling").sigma_max)


def temporal_factor(model):
    """Frames per latent frame after the first: the host's latent format says (Wan 2.x: 4); hosts
    before that attribute existed get 4 for 3D latent formats (Wan 2.1 is the one they have)."""
    fmt = model.model.latent_format
    f = getattr(fmt, "temporal_downscale_ratio", None)
    return int(f) if f else (4 if getattr(fmt, "latent_dimensions", 2) == 3 else 1)


def spatial_factor(model) -> int:
    """Image pixels per latent pixel (SD: 8)."""
    return getattr(model.model.latent_format, "spacial_downscale_ratio", 8)


# The dtypes a latent may have: others (float8, integers) are refused by name before any arithmetic.
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_layout(node: str, what: str, shape: tuple, dtype, model) -> None:
    """Samples of ``shape`` and ``dtype`` (read off a tensor, or a file's header) against the model's latents."""
    fmt = model.model.latent_format
    # latent_dimensions: 2 for image models (B,C,H,W), 3 for video models (B,C,T,H,W).
    dims = getattr(fmt, "latent_dimensions", 2) + 2
    if len(shape) not in (4, 5):
        fail(node, what, f"expected 4D (B,C,H,W) or 5D (B,C,T,H,W) samples, got shape {shape}")
    if dims not in (4, 5):
        fail(node, "model", f"its latents are {dims}D ({type(fmt).__name__}): only image (4D) and video (5D) "
                            "models are supported")
    if len(shape) != dims:
        kind = "an image model's" if dims == 4 else "a video model's"
        fail(node, what, f"has {len(shape)}D samples {shape} but this is {kind} ({type(fmt).__name__}, "
                         f"{dims}D latents): encode the input with the VAE that belongs to this model")
    channels = getattr(fmt, "latent_channels", shape[1])
    if shape[1] != channels:
        fail(node, what, f"has {shape[1]} channels but this model's latents have {channels}: "
                         "encode the image with the VAE that belongs to this model")
    if dtype not in FLOATS:
        fail(node, what, f"expected floating-point samples (float16, bfloat16, float32 or float64), got {dtype}")
    if 0 in shape:
        fail(node, what, f"is empty (shape {shape})")


def check_latent(node: str, latent, model, what: str = "latent") -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        fail(node, what, "expected a LATENT (a dict with a 'samples' tensor)")
    x = latent["samples"]
    check_layout(node, what, tuple(x.shape), x.dtype, model)
    if not torch.isfinite(x).all():
        fail(node, what, "holds NaN or inf values")
    return x
