"""StochasticEditSampler: several seeded edits from one inversion, each keeping the rest of the image."""

import torch
from comfy_api.latest import io

from ..solvers.editing.stochastic import edit_stochastic
from .host import edit_guider
from .host.inputs import SEEDS, cfg_input, fail, no_noise_mask
from .host.record import KEY, resume
from .host.region import NOISE_MASK, Region, editor_inputs
from .host.run import progress, run_guider, to_model


class StochasticEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_StochasticEditSampler",
            display_name="Stochastic Edit Sampler",
            category="sampling/inversion",
            description="Makes several seeded edits from one inversion in the edit-friendly noise space: the noise "
                        "maps that make an ancestral sampler with the source prompt reproduce the inverted "
                        "trajectory are replayed with the target prompt under blended guidance (the inversion's cfg "
                        "and the source's prediction outside the edit region, cfg inside), with fresh seeded noise "
                        "inside the region only, so every seed keeps the rest as the source. Since the source "
                        "branch is the trajectory itself, this is DirectInversion's correction at no extra cost. "
                        "Needs an inversion made with keep_trajectory. Image and video latents. Memory: two latents "
                        "per step plus count edits; model calls: steps x (1 + count). Each edit is scored by its "
                        "PSNR against the source outside the edit region (higher keeps the rest better; with a hard "
                        "mask every edit keeps it exactly).",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Latent.Input("inverted", tooltip="The output of Invert, with its trajectory kept."),
                io.Conditioning.Input("source", tooltip="The source prompt, as used for Invert."),
                io.Conditioning.Input("target", tooltip="The edited prompt."),
                cfg_input("cfg", 7.5, own=True,
                          tooltip="Guidance inside the edit region (outside: the inversion's cfg); -1 uses the "
                                  "inversion's cfg. Other negative values are refused."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of each step that is noise: 0 is deterministic (every seed alike), "
                                       "1 varies most."),
                io.Int.Input("seed", default=0, min=0, max=SEEDS - 1, control_after_generate=True,
                             tooltip="Edit k draws its noise from seed + k, so a seed always gives the same edits."),
                io.Int.Input("count", default=4, min=1, max=64, tooltip="How many edits to make."),
                *editor_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="edits", tooltip="All edits, count per input image, edit-major."),
                     io.Latent.Output(display_name="best", tooltip="The best-scoring edit of each input image."),
                     io.String.Output(display_name="scores", tooltip="Each edit's score (PSNR outside the region, dB)."),
                     io.Mask.Output(display_name="mask", tooltip="The edit region used, at image size.")],
        )

    @classmethod
    def execute(cls, model, inverted, source, target, cfg, eta, seed, count, negative=None, **region):
        node = "StochasticEditSampler"
        samples, rec = resume(node, inverted, model)
        no_noise_mask(node, inverted, "inverted", NOISE_MASK)
        if rec.inv.trajectory is None:
            fail(node, "inverted", "has no trajectory: set keep_trajectory on Invert")
        if not 0 <= eta <= 1:
            fail(node, "eta", f"expected a value in [0, 1], got {eta}")
        if count < 1:
            fail(node, "count", f"expected at least 1, got {count}")
        w_edit = rec.cfg_for(node, "cfg", cfg)
        region = Region(node, model, samples, region)
        steps = len(rec.inv.sigmas) - 1
        callback, shown = region.watch(progress(model, (1 + count) * steps))
        g = edit_guider.build(node, region.attach(model), region.capture, source, target, negative)
        b = samples.shape[0]
        seeds = [(seed + j) % SEEDS for j in range(count)]  # past the largest seed the host allows, on from 0

        def job(den, x, inner):
            traj = [to_model(inner, t, x) for t in rec.inv.trajectory]
            edits, scores, _ = edit_stochastic(g.model(den), traj, rec.inv.sigmas, region.spec, rec.cfg, w_edit,
                                               seeds, space=rec.inv.space, eta=eta,
                                               callback=callback)
            return scores, edits

        scores, out = run_guider(node, g, samples, rec.inv.sigmas.flip(0), job)
        best = scores.view(count, b).argmax(0)
        base = {k: v for k, v in inverted.items() if k not in ("samples", KEY, "batch_index")}
        edits = dict(base, samples=out)
        top = dict(base, samples=out.view(count, b, *out.shape[1:])[best, torch.arange(b)])
        text = "\n".join(f"edit {j} (seed {seeds[j]}), image {i}: {float(scores[j * b + i]):.2f} dB"
                         for j in range(count) for i in range(b))
        return io.NodeOutput(edits, top, text, shown(model))
