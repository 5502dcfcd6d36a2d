"""The edit region of the editing nodes: its inputs, their checks, and the mask they give.

The region comes from the attention of the edited words on the image (``capture``, tokens
from ``tokens``), from a MASK input, or from both combined. For video latents
(B, C, T, H, W) a MASK's batch is frames: the first latent frame holds the first frame
and each later one as many frames as the model's temporal compression (Wan: 4), so F
frames cover 1 + (F - 1) / 4 latent frames; a one-frame MASK applies to every frame.
The editors take the region as a value (``Region.spec``, a ``solvers.editing.masks.Region``)
and build each step's mask themselves; the MASK a node returns is the region's values the
editor reported last (``watch``).
"""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from ...solvers import SolverError
from ...solvers.editing import masks
from . import attention, tokens
from .inputs import fail
from .model import spatial_factor, temporal_factor

MODES = list(masks.MODES)
SPEC = masks.Region  # the region's defaults: the solvers' value type owns them
# Why an editor refuses a LATENT's noise_mask (SetLatentNoiseMask) rather than ignore it.
NOISE_MASK = ("its edit region is the mask input (or the edited words): connect the mask there instead of "
              "SetLatentNoiseMask")


def editor_inputs():
    """What every editor's inputs end with: the negative prompt, then the edit region (``inputs``)."""
    return [io.Conditioning.Input("negative", optional=True,
                                  tooltip="Negative prompt; unconnected, a zeroed source (as ConditioningZeroOut)."),
            *inputs()]


def inputs():
    """The edit-region inputs every editing node takes."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="The CLIP that encoded the prompts: finds the edited words' tokens for the attention "
                              "mask. Leave unconnected, and the texts and words empty, to use only the MASK input."),
        io.String.Input("source_text", multiline=True, default="",
                        tooltip="The source prompt's text (as encoded into 'source'), to locate its words."),
        io.String.Input("target_text", multiline=True, default="",
                        tooltip="The target prompt's text (as encoded into 'target'), to locate its words."),
        io.String.Input("words", default="",
                        tooltip="Words whose attention marks the edit region, separated by commas or spaces. "
                                "Empty: the words of the target text missing from the source text, and the "
                                "words of the source text missing from the target text."),
        io.Mask.Input("mask", optional=True,
                      tooltip="A region to edit (white = edit), values in [0, 1]. Combined with the attention mask by "
                              "mask_mode. For video, one mask per frame or one for all frames."),
        io.Combo.Input("mask_mode", options=MODES, default=SPEC.mode,
                       tooltip="How a MASK input meets the attention mask: replace it, union or intersect."),
        io.Float.Input("threshold", default=SPEC.threshold, min=0.0, max=1.0, step=0.01,
                       tooltip="Attention (relative to its maximum) above which a pixel is edited. Lower grows the region."),
        io.Float.Input("softness", default=SPEC.softness, min=0.0, max=1.0, step=0.01,
                       tooltip="Width of a linear ramp around the threshold; 0 gives a hard mask."),
        io.Int.Input("dilation", default=SPEC.dilation, min=0, max=16,
                     tooltip="Grow the attention mask by this many latent pixels (8 image pixels each for SD)."),
        # The node's own default, the edit benchmark's best; the solvers' Region keeps the mask as given (0).
        io.Int.Input("feather", default=1, min=0, max=64,
                     tooltip="Soften the region's edge inwards over this many latent pixels (8 image pixels each "
                             "for SD), so the edit fades in instead of showing a seam; outside the region nothing "
                             "changes. 1 (the default) brings the pack's edit benchmark to no visible seam at the "
                             "least cost in edit strength; 0: the region as given."),
        io.Boolean.Input("grow", default=SPEC.grow,
                         tooltip="Grow the region step by step, as DifferentialDiffusion does: at each step a pixel "
                                 "is edited once a threshold falling from 1 towards 0 reaches its value (white from "
                                 "the first step, black never). Off: the values weigh the edit per pixel."),
    ]


def given(values: dict) -> dict:
    """The region inputs of a node's call, each one left out at its default as ``inputs`` states it (the
    host passes them all; a direct call may pass some)."""
    return {i.id: values.get(i.id, getattr(i, "default", None)) for i in inputs()}


class Region:
    """The edit region of one node run: validated inputs, the attention capture, the region's value.
    ``values``: the node's region inputs by name (``inputs``); ``required``: refuse a run without a region."""

    def __init__(self, node, model, latent, values: dict, required=True):
        v = given(values)
        for name in set(values) - set(v):
            fail(node, name, "is not an input of this node")
        mask, mask_mode, feather = v["mask"], v["mask_mode"], v["feather"]
        self.node = node
        self.layers = attention.unet_layers(model)
        # ``latent`` comes through record.resume, whose check_latent matched its dimensionality to the model's.
        self.batch, self.size = latent.shape[0], tuple(latent.shape[2:])
        self.ratio = spatial_factor(model)
        self.per_frame = temporal_factor(model) if latent.ndim == 5 else 1  # frames per latent frame
        if mask_mode not in MODES:
            fail(node, "mask_mode", f"expected one of {', '.join(MODES)}, got {mask_mode!r}")
        for name in ("feather", "dilation"):
            if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 0:
                fail(node, name, f"expected a whole number of latent pixels >= 0, got {v[name]!r}")
        for name in ("threshold", "softness"):  # NaN passes the host's range check and would empty the region
            if isinstance(v[name], bool) or not isinstance(v[name], (int, float)) or not 0 <= v[name] <= 1:
                fail(node, name, f"expected a number from 0 to 1, got {v[name]!r}")
        if v["clip"] is None:
            for name in ("words", "source_text", "target_text"):
                if isinstance(v[name], str) and v[name].strip():
                    fail(node, name, "needs the clip input, which finds the words' tokens: connect the CLIP that "
                                     "encoded the prompts, or clear the text to edit the MASK's region only")
        user = None if mask is None else self.user_mask(mask)
        found, counts = {"source": [], "target": []}, {}
        if v["clip"] is not None and not (mask is not None and mask_mode == "replace"):
            found, counts = tokens.edited(node, v["clip"], v["source_text"], v["target_text"], v["words"],
                                          None if self.layers else "t5xxl")
        # Without a MASK or words, an editor that may edit everything does (``required=False``).
        if user is None and not any(found.values()) and required:
            fail(node, "mask", "no edit region: connect a MASK, or a CLIP with the prompts' texts and the words to edit")
        self.capture = attention.Capture(found, counts, self.size)
        self.spec = masks.Region(user, self.capture.active(), mask_mode, v["threshold"], v["softness"], v["dilation"],
                                 int(feather), bool(v["grow"]))

    def user_mask(self, mask):
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or not mask.is_floating_point() \
                or mask.numel() == 0:
            fail(self.node, "mask", "expected a MASK (H, W) or (B, H, W) of floats, not empty, got "
                                    f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            fail(self.node, "mask", f"values must lie in [0, 1] (white = edit), got [{float(mask.min()):g}, "
                                    f"{float(mask.max()):g}]: clamp or normalise the mask first")
        mask = mask if mask.ndim == 3 else mask[None]
        h, w = self.size[-2:]
        if abs(mask.shape[-2] * w - mask.shape[-1] * h) > max(h, w) * self.ratio:
            fail(self.node, "mask", f"is {mask.shape[-1]}x{mask.shape[-2]} but the image is {w * self.ratio}x"
                                    f"{h * self.ratio} (latent {w}x{h}): resize the mask to the image")
        if len(self.size) == 3:
            t = self.size[0]
            try:
                mask = masks.per_latent_frame(mask, t, self.per_frame)
            except SolverError as e:
                fail(self.node, "mask", str(e))
            return masks.resize_mask(mask[None], self.size, self.batch)
        if mask.shape[0] not in (1, self.batch):
            fail(self.node, "mask", f"has a batch of {mask.shape[0]}, expected 1 or the latent's {self.batch}")
        return masks.resize_mask(mask, self.size, self.batch)

    def attach(self, model):
        return self.capture.attach(model, self.layers)

    def watch(self, callback):
        """(a callback that passes the editor's reports on to ``callback``, a function giving the
        region's values it reported last as the node's MASK)."""
        last = {}

        def watched(d):
            if "mask" in d:
                last["mask"] = d["mask"]
            callback(d)

        def shown(model):
            m = last.get("mask") if "mask" in last else self.spec.soft(None, torch.zeros(1, 1, *self.size))
            m = torch.ones(1, 1, *self.size) if m is None else m
            return image_mask(self, m.expand(self.batch, *m.shape[1:]), model)
        return watched, shown


def image_mask(region, m, model):
    """The region a node used, as a MASK at image resolution: (B, H, W), or for video (frames, H, W)
    with each latent frame repeated over the frames it holds."""
    m = m.float().clamp(0, 1)
    if m.ndim == 5:
        m = m[0, 0]  # (T, h, w): the first item's (the MASK's batch is frames)
        m = torch.cat([m[:1], m[1:].repeat_interleave(region.per_frame, 0)])[:, None]
    m = torch.nn.functional.interpolate(m, scale_factor=region.ratio, mode="nearest")
    return m[:, 0].to(comfy.model_management.intermediate_device())
