"""ReconstructionReport: how close a reconstruction is to its original, shown on the node."""

import torch
from comfy_api.latest import io, ui

from ..solvers import metrics
from .host.inputs import fail

NODE = "ReconstructionReport"


def _latent(what, v):
    if not isinstance(v, dict) or not isinstance(v.get("samples"), torch.Tensor) or v["samples"].ndim not in (4, 5):
        fail(NODE, what, "expected a LATENT with 4D (B,C,H,W) or 5D (B,C,T,H,W) samples")
    if v["samples"].numel() == 0:
        fail(NODE, what, f"is empty: its samples have shape {tuple(v['samples'].shape)}")
    return v["samples"]


def _image(what, v):
    if not isinstance(v, torch.Tensor) or v.ndim != 4:
        fail(NODE, what, "expected an IMAGE (a B,H,W,C tensor)")
    if v.numel() == 0:
        fail(NODE, what, f"is empty: shape {tuple(v.shape)}")
    return v.movedim(-1, 1)  # metrics are channel-first


def _both(kind, a, b, convert):
    for what, v in ((f"{kind}_a", a), (f"{kind}_b", b)):
        if v is None:
            fail(NODE, what, f"is not connected; connect both {kind}_a and {kind}_b")
    return convert(f"{kind}_a", a), convert(f"{kind}_b", b)


def pick(latent_a, latent_b, image_a, image_b):
    """(reference, test, data range, label) from whichever pair is connected."""
    has_latents = latent_a is not None or latent_b is not None
    has_images = image_a is not None or image_b is not None
    if has_latents and has_images:
        fail(NODE, "latent_a", "connect either latent_a and latent_b or image_a and image_b, not both pairs")
    if has_images:
        kind, (a, b) = "image", _both("image", image_a, image_b, _image)
        span, label = 1.0, "images, data range 1"  # IMAGE values lie in [0, 1]
    elif has_latents:
        kind, (a, b) = "latent", _both("latent", latent_a, latent_b, _latent)
        # latents have no fixed range: PSNR and SSIM use each reference item's max - min
        span, label = None, "latents, data range: latent_a max - min per item"
    else:
        fail(NODE, "latent_a", "nothing connected: connect latent_a and latent_b, or image_a and image_b")
    if a.shape != b.shape:
        fail(NODE, f"{kind}_b", f"has shape {tuple(b.shape)} but {kind}_a has {tuple(a.shape)}: "
                                "expected the same shape")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        fail(NODE, f"{kind}_a", "the inputs hold NaN or inf values")
    return a, b, span, f"{a.shape[0]} item(s), {label}"


class ReconstructionReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_ReconstructionReport",
            display_name="Reconstruction Report",
            category="sampling/inversion",
            description="Compares a reconstruction with its original, per batch item and on average: relative "
                        "error ||b - a|| / ||a||, PSNR and SSIM (Gaussian window, sigma 1.5, as scikit-image). "
                        "Connect two LATENTs or two IMAGEs; 'a' is the reference. Images use data range 1, "
                        "latents the reference's max - min per item.",
            inputs=[
                io.Latent.Input("latent_a", optional=True, tooltip="Reference latent, e.g. the VAE-encoded original."),
                io.Latent.Input("latent_b", optional=True, tooltip="Latent to judge, e.g. Reconstruct's output."),
                io.Image.Input("image_a", optional=True, tooltip="Reference image, e.g. the loaded original."),
                io.Image.Input("image_b", optional=True, tooltip="Image to judge, e.g. the decoded reconstruction."),
            ],
            outputs=[
                io.Float.Output(display_name="rel_error", tooltip="Mean over the batch of ||b - a|| / ||a||."),
                io.Float.Output(display_name="psnr", tooltip="Mean PSNR in dB (inf where b equals a)."),
                io.Float.Output(display_name="ssim", tooltip="Mean SSIM, 1 for identical inputs."),
                io.String.Output(display_name="report", tooltip="The per-item table shown on the node."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent_a=None, latent_b=None, image_a=None, image_b=None):
        a, b, span, label = pick(latent_a, latent_b, image_a, image_b)
        m = metrics.report(a, b, span)
        text = metrics.table(m, label)
        mean = m["mean"]
        return io.NodeOutput(mean["rel_error"], mean["psnr"], mean["ssim"], text, ui=ui.PreviewText(text))
