"""BlendedGuidanceSampler: strong guidance only where the edit happens (AIDI's blended guidance)."""

from comfy_api.latest import io

from ..solvers import sampler_for
from ..solvers.editing.blended import edit_blended
from ..solvers.editing.direct import edit_direct
from .host import edit_guider
from .host.inputs import cfg_input, fail, no_noise_mask
from .host.record import KEY, resume
from .host.region import NOISE_MASK, Region, editor_inputs
from .host.run import progress, run_guider, to_model


class BlendedGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_BlendedGuidanceSampler",
            display_name="Blended Guidance Edit",
            category="sampling/inversion",
            description="Edits an inverted image with a new prompt, applying the strong edit guidance only inside "
                        "the edit region: W = cfg_inversion + (cfg_edit - cfg_inversion) * M. M comes from the "
                        "attention of the edited words on the image (UNets such as SD1.5 and SDXL, joint-attention "
                        "DiTs such as SD3 and Flux, and Wan's cross attention per latent frame; needs the CLIP and "
                        "the prompts' texts) and/or a MASK. Image and video latents. Runs a source branch beside the "
                        "target one when the mask needs source words, latent blending or DirectInversion is on "
                        "(twice the model calls).",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Latent.Input("inverted", tooltip="The output of Invert."),
                io.Conditioning.Input("source", tooltip="The source prompt, as used for Invert."),
                io.Conditioning.Input("target", tooltip="The edited prompt."),
                cfg_input("cfg_inversion", -1.0, own=True,
                          tooltip="Guidance outside the edit region; -1 uses the inversion's cfg (most faithful). "
                                  "Other negative values are refused."),
                cfg_input("cfg_edit", 7.5,
                          tooltip="Guidance inside the edit region: higher edits more strongly."),
                io.Float.Input("mask_steps", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the noisy end) during which the mask is active; "
                                       "afterwards every pixel takes cfg_inversion and no blending."),
                io.Boolean.Input("local_blend", default=True,
                                 tooltip="Outside the mask, take the source branch's prediction, so the unedited "
                                         "region stays as reconstructed (prompt-to-prompt's local blend)."),
                *editor_inputs(),
                io.Boolean.Input("direct", default=False,
                                 tooltip="DirectInversion (PnP inversion): each step puts the source branch back on "
                                         "the inverted trajectory and gives the target the same correction, so what "
                                         "an approximate inversion (ddim, easyinv, renoise...) loses is not lost in "
                                         "the edit. Needs keep_trajectory on Invert; single-state methods only (bdia "
                                         "and edict already sample back exactly)."),
            ],
            outputs=[io.Latent.Output(display_name="edited", tooltip="The edited latent."),
                     io.Mask.Output(display_name="mask", tooltip="The edit region the sampler used, at image size.")],
        )

    @classmethod
    def execute(cls, model, inverted, source, target, cfg_inversion, cfg_edit, mask_steps, local_blend, negative=None,
                direct=False, **region):
        node = "BlendedGuidanceSampler"
        samples, rec = resume(node, inverted, model)
        no_noise_mask(node, inverted, "inverted", NOISE_MASK)
        w_inv = rec.cfg_for(node, "cfg_inversion", cfg_inversion)
        if cfg_edit < 0:
            fail(node, "cfg_edit", f"expected a value >= 0, got {cfg_edit}")
        if not 0 <= mask_steps <= 1:
            fail(node, "mask_steps", f"expected a value in [0, 1], got {mask_steps}")
        if direct and rec.inv.pair is not None:
            fail(node, "direct", f"DirectInversion applies to single-state methods; {rec.inv.method} samples back "
                                 "exactly from its pair of states already, and its second state has no trajectory to "
                                 "snap to: turn direct off")
        if direct and rec.inv.trajectory is None:
            fail(node, "direct", "DirectInversion needs the inversion's trajectory: set keep_trajectory on Invert")
        region = Region(node, model, samples, region)
        fn, kwargs = sampler_for(rec.inv.sampler, rec.inv.settings)
        sigmas = rec.inv.sigmas.flip(0)
        callback, shown = region.watch(progress(model, len(sigmas) - 1))
        g = edit_guider.build(node, region.attach(model), region.capture, source, target, negative)
        source_branch = local_blend or bool(region.capture.tokens["source"])

        def job(den, x, inner):
            model_ = g.model(den)
            if direct:
                traj = [to_model(inner, t, x) for t in rec.inv.trajectory]
                out, _ = edit_direct(model_, traj, rec.inv.sigmas, region.spec, w_inv, cfg_edit, space=rec.inv.space,
                                     mask_steps=mask_steps, local_blend=local_blend, callback=callback)
            else:
                out, _ = edit_blended(model_, x, sigmas, region.spec, w_inv, cfg_edit, sampler=fn, sampler_args=kwargs,
                                      pair=to_model(inner, rec.inv.pair, x), space=rec.inv.space, mask_steps=mask_steps,
                                      local_blend=local_blend, source=source_branch, callback=callback)
            return None, out

        _, out = run_guider(node, g, samples, sigmas, job)
        result = {k: v for k, v in inverted.items() if k not in ("samples", KEY)}
        result["samples"] = out
        return io.NodeOutput(result, shown(model))
