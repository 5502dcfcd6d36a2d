"""The nodes' input errors, and checks of the inputs every node shares (prompts, noise masks)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

CFG_MAX = 100.0  # the top of every guidance input, as the host's KSampler's
SEEDS = 1 << 64  # how many seeds a seed input offers, 0 to 2^64 - 1, as KSampler's


class NodeInputError(ValueError):
    """A node's input is unusable; the message names the node, the input and what was expected."""


def fail(node: str, what: str, message: str):
    raise NodeInputError(f"{node}: input '{what}': {message}")


def cfg_input(name: str, default: float, tooltip: str, own: bool = False):
    """A guidance input, from 0 (or from -1, the inversion's own, where ``own``) to ``CFG_MAX``."""
    return io.Float.Input(name, default=default, min=-1.0 if own else 0.0, max=CFG_MAX, step=0.1, round=0.01,
                          tooltip=tooltip)


def check_cfg(node: str, what: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= CFG_MAX:
        fail(node, what, f"expected a value from 0 to {CFG_MAX:g}, got {w}")
    return float(w)


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


def negative_for(node: str, positive, negative, what: str = "positive"):
    """Checks the prompts; a missing negative becomes a zeroed positive."""
    check_conditioning(node, positive, what)
    if negative is None:
        return zero_out(positive)
    return check_conditioning(node, negative, "negative")
