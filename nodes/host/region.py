"""The edit region of the editing nodes: its inputs, their checks, and the mask they give.

The region comes from the attention of the edited words on the image (``capture``, tokens
from ``tokens``), from a MASK input, or from both combined. For video latents
(B, C, T, H, W) a MASK's batch is frames: the first latent frame holds the first frame
and each later one as many frames as the model's temporal compression (Wan: 4), so F
frames cover 1 + (F - 1) / 4 latent frames; a one-frame MASK applies to every frame.
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

MODES = ["replace", "union", "intersect"]
# Why an editor refuses a LATENT's noise_mask (SetLatentNoiseMask) rather than ignore it.
NOISE_MASK = ("its edit region is the mask input (or the edited words): connect the mask there instead of "
              "SetLatentNoiseMask")


def inputs():
    """The edit-region inputs every editing node takes."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="The CLIP that encoded the prompts: finds the edited words' tokens for the attention "
                              "mask. Leave unconnected to use only the MASK input."),
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
        io.Combo.Input("mask_mode", options=MODES, default="union",
                       tooltip="How a MASK input meets the attention mask: replace it, union or intersect."),
        io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                       tooltip="Attention (relative to its maximum) above which a pixel is edited. Lower grows the region."),
        io.Float.Input("softness", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Width of a linear ramp around the threshold; 0 gives a hard mask."),
        io.Int.Input("dilation", default=1, min=0, max=16,
                     tooltip="Grow the attention mask by this many latent pixels (8 image pixels each for SD)."),
    ]


class Region:
    """The edit region of one node run: validated inputs, the attention capture, the mask."""

    def __init__(self, node, model, latent, clip, source_text, target_text, words, mask, mask_mode, threshold,
                 softness, dilation, required=True):
        self.node, self.mode = node, mask_mode
        self.layers = attention.unet_layers(model)
        self.threshold, self.softness, self.dilation = threshold, softness, dilation
        # ``latent`` comes through record.resume, whose check_latent matched its dimensionality to the model's.
        self.batch, self.size = latent.shape[0], tuple(latent.shape[2:])
        self.ratio = spatial_factor(model)
        self.per_frame = temporal_factor(model) if latent.ndim == 5 else 1  # frames per latent frame
        if mask_mode not in MODES:
            fail(node, "mask_mode", f"expected one of {', '.join(MODES)}, got {mask_mode!r}")
        self.user = None if mask is None else self.user_mask(mask)
        found, counts = {"source": [], "target": []}, {}
        if clip is not None and not (mask is not None and mask_mode == "replace"):
            found, counts = tokens.edited(node, clip, source_text, target_text, words, None if self.layers else "t5xxl")
        # Without a MASK or words, an editor that may edit everything does (``required=False``).
        self.whole = self.user is None and not any(found.values())
        if self.whole and required:
            fail(node, "mask", "no edit region: connect a MASK, or a CLIP with the prompts' texts and the words to edit")
        self.capture = attention.Capture(found, counts, self.size)
        self.guider = None

    def user_mask(self, mask):
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or not mask.is_floating_point():
            fail(self.node, "mask", "expected a MASK (H, W) or (B, H, W) of floats")
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

    def current(self):
        """The mask now: (B, 1, *size), from the maps gathered so far and the MASK input."""
        raw = self.capture.raw(self.batch)
        if raw is None and self.capture.active() and self.guider is not None and self.guider.seen \
                and self.capture.branch is None:
            fail(self.node, "model", "no attention on the edited words could be read from this model (it has "
                                     "neither UNet cross-attention nor text attention the pack can read): connect a "
                                     "MASK and set mask_mode to replace")
        att = None if raw is None else masks.shape_mask(raw, self.threshold, self.softness, self.dilation)
        user = None if self.user is None else self.user.to(raw.device if raw is not None else self.user.device)
        m = masks.combine_masks(att, user, self.mode)
        return torch.full((self.batch, 1, *self.size), float(self.whole)) if m is None else m

    def mask(self):
        """What the solvers take: the fixed MASK when no attention is read, else ``current`` itself."""
        return self.user if not self.capture.active() else self.current


def image_mask(region, m, model):
    """The region a node used, as a MASK at image resolution: (B, H, W), or for video (frames, H, W)
    with each latent frame repeated over the frames it holds."""
    m = m.float().clamp(0, 1)
    if m.ndim == 5:
        m = m[0, 0]  # (T, h, w): the first item's (the MASK's batch is frames)
        m = torch.cat([m[:1], m[1:].repeat_interleave(region.per_frame, 0)])[:, None]
    m = torch.nn.functional.interpolate(m, scale_factor=region.ratio, mode="nearest")
    return m[:, 0].to(comfy.model_management.intermediate_device())
