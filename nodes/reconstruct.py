"""Reconstruct: sample an inverted latent back down its own schedule with the matching sampler."""

from comfy_api.latest import io

from ..solvers import reconstruct
from .host.inputs import cfg_input, no_noise_mask
from .host.record import KEY, resume
from .host.run import guided, progress


class Reconstruct(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_Reconstruct",
            display_name="Reconstruct from Noise",
            category="sampling/inversion",
            description="Samples an inverted LATENT back to an image latent over the inversion's own schedule, "
                        "with the sampler its method needs (Euler/DDIM, or BDIA/EDICT from their pair). With the "
                        "inversion's prompt and cfg this returns the original; a plain LATENT is refused (use "
                        "KSampler for those).",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Latent.Input("inverted", tooltip="The output of Invert."),
                io.Conditioning.Input("positive", tooltip="The prompt to sample with; the source prompt reconstructs."),
                cfg_input("cfg", -1.0, own=True,
                          tooltip="Guidance; -1 (only -1) uses the cfg the inversion used, needed for an exact return."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; unconnected, a zeroed positive (as ConditioningZeroOut)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The reconstructed image latent.")],
        )

    @classmethod
    def execute(cls, model, inverted, positive, cfg, negative=None):
        node = "Reconstruct"
        samples, rec = resume(node, inverted, model)
        no_noise_mask(node, inverted, "inverted", "it reconstructs the whole latent. Remove SetLatentNoiseMask "
                                                  "between Invert and Reconstruct")
        w = rec.cfg_for(node, "cfg", cfg)
        sigmas = rec.inv.sigmas.flip(0)
        callback = progress(model, len(sigmas) - 1)

        def job(den, x, inner):
            return None, reconstruct(den, rec.in_model_space(inner, x), callback=callback)

        _, out = guided(node, model, positive, negative, w, samples, sigmas, job)
        result = {k: v for k, v in inverted.items() if k not in ("samples", KEY)}
        result["samples"] = out
        return io.NodeOutput(result)
