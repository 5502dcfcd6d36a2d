"""BlendedGuidanceSampler: strong guidance only where the edit happens (AIDI's blended guidance)."""

import math

import torch
from comfy_api.latest import io

from ..solvers import editing, sampler_for
from . import edit
from .host import RECORD, image_mask, progress, resume, run_guider, to_model


class BlendedGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_BlendedGuidanceSampler",
            display_name="Blended Guidance Edit",
            category="sampling/inversion",
            description="Edits an inverted image with a new prompt, applying the strong edit guidance only inside "
                        "the edit region: W = cfg_inversion + (cfg_edit - cfg_inversion) * M. M comes from the "
                        "attention of the edited words on the image (UNets such as SD1.5 and SDXL, and joint-attention "
                        "DiTs such as SD3 and Flux; needs the CLIP and the prompts' texts) and/or a MASK. Runs a source branch beside the target one when the mask "
                        "needs source words or latent blending is on (twice the model calls).",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Latent.Input("inverted", tooltip="The output of Invert."),
                io.Conditioning.Input("source", tooltip="The source prompt, as used for Invert."),
                io.Conditioning.Input("target", tooltip="The edited prompt."),
                io.Float.Input("cfg_inversion", default=-1.0, min=-1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance outside the edit region; -1 uses the inversion's cfg (most faithful)."),
                io.Float.Input("cfg_edit", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance inside the edit region: higher edits more strongly."),
                io.Float.Input("mask_steps", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the noisy end) during which the mask is active; "
                                       "afterwards every pixel takes cfg_inversion and no blending."),
                io.Boolean.Input("local_blend", default=True,
                                 tooltip="Outside the mask, take the source branch's prediction, so the unedited "
                                         "region stays as reconstructed (prompt-to-prompt's local blend)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; unconnected, a zeroed source (as ConditioningZeroOut)."),
                *edit.inputs(),
            ],
            outputs=[io.Latent.Output(display_name="edited", tooltip="The edited latent."),
                     io.Mask.Output(display_name="mask", tooltip="The edit region the sampler used, at image size.")],
        )

    @classmethod
    def execute(cls, model, inverted, source, target, cfg_inversion, cfg_edit, mask_steps, local_blend, negative=None,
                clip=None, source_text="", target_text="", words="", mask=None, mask_mode="union", threshold=0.3,
                softness=0.0, dilation=1):
        node = "BlendedGuidanceSampler"
        samples, rec = resume(node, inverted, model)
        region = edit.Region(node, model, samples, clip, source_text, target_text, words, mask, mask_mode, threshold,
                             softness, dilation)
        w_inv = rec["cfg"] if cfg_inversion < 0 else cfg_inversion
        fn, kwargs = sampler_for(rec["sampler"], rec["settings"])
        sigmas = rec["sigmas"].flip(0)
        steps = len(sigmas) - 1
        active = math.ceil(mask_steps * steps)
        two = local_blend or bool(region.tokens["source"])
        callback = progress(model, steps)
        guider = edit.guider(node, model, region, source, target, negative)
        sig = [float(s) for s in sigmas]

        def denoise(g, x, t, mo, seed):
            k = min(range(steps), key=lambda j: abs(sig[j] - float(t[0])))
            on = k < active and cfg_edit != w_inv
            xs, xt = x.chunk(2) if two else (None, x)
            d_s = g.guided("source", xs, t[:len(xs)], w_inv, mo, seed) if two else None
            uniform = region.uniform()
            if not on:
                scale = w_inv
            elif uniform is not None:
                scale = w_inv + (cfg_edit - w_inv) * uniform
            else:
                scale = lambda: editing.per_pixel_scale(w_inv, cfg_edit, region.current())
            d_t = g.guided("target", xt, t[-len(xt):], scale, mo, seed)
            if two and local_blend and k < active:
                d_t = editing.local_blend(d_s, d_t, region.current().to(d_t))
            return d_t if not two else torch.cat([d_s, d_t])

        guider.run = denoise

        def job(den, x, inner):
            pair = to_model(inner, rec["pair"], x[: samples.shape[0]])
            if two and pair is not None:
                pair = torch.cat([pair, pair])
            return None, fn(den, x, sigmas, None, callback, space=rec["space"], pair=pair, **kwargs)

        start = torch.cat([samples, samples]) if two else samples
        _, out = run_guider(node, guider, start, sigmas, job)
        result = {k: v for k, v in inverted.items() if k not in ("samples", RECORD)}
        result["samples"] = out[-samples.shape[0]:]
        used = region.current()
        return io.NodeOutput(result, image_mask(used, model))
