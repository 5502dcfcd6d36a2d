"""StochasticEditSampler: several seeded edits from one inversion, ranked by how well they keep the rest."""

import torch
from comfy_api.latest import io

from ..solvers import SolverError, edit_friendly, editing
from . import edit
from .host import RECORD, fail, image_mask, progress, resume, run_guider, to_model


class StochasticEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_StochasticEditSampler",
            display_name="Stochastic Edit Sampler",
            category="sampling/inversion",
            description="Makes several seeded edits from one inversion in the edit-friendly noise space: the noise "
                        "maps that make an ancestral sampler with the source prompt reproduce the inverted "
                        "trajectory are replayed with the target prompt, with fresh seeded noise inside the edit "
                        "region. Needs an inversion made with keep_trajectory. Memory: one latent per step for the "
                        "noise maps (O(steps x latent)) plus count edits. Each edit is scored by its PSNR against the "
                        "source outside the edit region (higher keeps the rest better).",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the inversion."),
                io.Latent.Input("inverted", tooltip="The output of Invert, with its trajectory kept."),
                io.Conditioning.Input("source", tooltip="The source prompt, as used for Invert."),
                io.Conditioning.Input("target", tooltip="The edited prompt."),
                io.Float.Input("cfg", default=7.5, min=-1.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the edits; -1 uses the inversion's cfg."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of each step that is noise: 0 is deterministic (every seed alike), "
                                       "1 varies most."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Edit k draws its noise from seed + k, so a seed always gives the same edits."),
                io.Int.Input("count", default=4, min=1, max=64, tooltip="How many edits to make."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; unconnected, a zeroed source (as ConditioningZeroOut)."),
                *edit.inputs(),
            ],
            outputs=[io.Latent.Output(display_name="edits", tooltip="All edits, count per input image, edit-major."),
                     io.Latent.Output(display_name="best", tooltip="The best-scoring edit of each input image."),
                     io.String.Output(display_name="scores", tooltip="Each edit's score (PSNR outside the region, dB)."),
                     io.Mask.Output(display_name="mask", tooltip="The edit region used, at image size.")],
        )

    @classmethod
    def execute(cls, model, inverted, source, target, cfg, eta, seed, count, negative=None, clip=None, source_text="",
                target_text="", words="", mask=None, mask_mode="union", threshold=0.3, softness=0.0, dilation=1):
        node = "StochasticEditSampler"
        samples, rec = resume(node, inverted, model)
        if rec["trajectory"] is None:
            fail(node, "inverted", "has no trajectory: set keep_trajectory on Invert")
        if not 0 <= eta <= 1:
            fail(node, "eta", f"expected a value in [0, 1], got {eta}")
        if count < 1:
            fail(node, "count", f"expected at least 1, got {count}")
        region = edit.Region(node, model, samples, clip, source_text, target_text, words, mask, mask_mode, threshold,
                             softness, dilation)
        w_inv, w_edit = rec["cfg"], rec["cfg"] if cfg < 0 else cfg
        sigmas = rec["sigmas"]
        steps = len(sigmas) - 1
        b = samples.shape[0]
        callback = progress(model, 2 * steps)
        guider = edit.guider(node, model, region, source, target, negative)
        phase = {"name": "maps"}

        def denoise(g, x, t, mo, seed_):
            if phase["name"] == "maps":
                if region.tokens["target"]:
                    g.guided("target", x, t, w_inv, mo, seed_)  # for the target words' attention only
                return g.guided("source", x, t, w_inv, mo, seed_)
            return g.guided("target", x, t, w_edit, mo, seed_)

        guider.run = denoise
        gens = [torch.Generator().manual_seed(seed + j) for j in range(count)]

        def fresh(k):
            return torch.cat([torch.randn(samples.shape, generator=g) for g in gens])

        def job(den, x, inner):
            traj = [to_model(inner, t, x) for t in rec["trajectory"]]
            maps, _ = edit_friendly.noise_maps(den, traj, sigmas, callback=callback, space=rec["space"], eta=eta)
            phase["name"] = "replay"
            m = region.current().to(x)
            shifted = lambda d: callback(dict(d, i=d["i"] + steps))
            edits = edit_friendly.replay(den, traj[-1].repeat(count, 1, 1, 1), sigmas.flip(0), maps, callback=shifted,
                                         space=rec["space"], eta=eta, fresh=fresh, mask=m)
            return (m, editing.preservation(edits, traj[0], m)), edits

        try:
            (used, scores), out = run_guider(node, guider, samples.repeat(count, 1, 1, 1), sigmas, job)
        except SolverError as e:
            fail(node, "inverted", str(e))
        best = scores.view(count, b).argmax(0)
        base = {k: v for k, v in inverted.items() if k not in ("samples", RECORD, "batch_index")}
        edits = dict(base, samples=out)
        top = dict(base, samples=out.view(count, b, *out.shape[1:])[best, torch.arange(b)])
        text = "\n".join(f"edit {j} (seed {seed + j}), image {i}: {float(scores[j * b + i]):.2f} dB"
                         for j in range(count) for i in range(b))
        return io.NodeOutput(edits, top, text, image_mask(used, model))
