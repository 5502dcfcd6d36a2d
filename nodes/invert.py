"""Invert: a VAE-encoded image to the noise latent that the model would turn back into it."""

import logging
from dataclasses import replace

import comfy.samplers
from comfy_api.latest import io, ui

from ..solvers import DEFAULT, METHODS, invert, metrics, reconstruct
from ..solvers.record import MAX_STEPS, summary
from .host import widgets
from .host.inputs import cfg_input, check_cfg, fail, no_noise_mask
from .host.model import check_latent, describe, space_of
from .host.record import Record, not_inverted
from .host.run import guided, progress, sigmas_for, to_model, to_vae


class Invert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_Invert",
            display_name="Invert to Noise",
            category="sampling/inversion",
            description="Inverts a VAE-encoded image to its noise latent with the chosen method, so that "
                        "Reconstruct returns the image and the editing nodes can change it. Works with EPS "
                        "(SD1.5, SDXL), v-prediction (SD2) and flow (SD3, Flux) models. The output LATENT "
                        "carries the schedule, method, BDIA/EDICT pair and trajectory under the key "
                        "'inversion'; core nodes that rebuild the LATENT dict drop it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with; Reconstruct and the editors need the same one."),
                io.Latent.Input("latent", tooltip="The image to invert, encoded with the model's VAE."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a description of the image as it is."),
                io.Combo.Input("method", options=list(METHODS), default=DEFAULT, tooltip=widgets.method_help(METHODS)),
                io.Int.Input("steps", default=20, min=1, max=MAX_STEPS,
                             tooltip="Inversion steps; Reconstruct and the editors sample back over the same schedule."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The host's scheduler, as in KSampler ('simple' for flow models)."),
                cfg_input("cfg", 1.0,
                          tooltip="Guidance while inverting. Keep it near 1: higher values make every "
                                  "method but BDIA and EDICT drift. Editors apply stronger guidance later."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="How far to invert: 1 reaches pure noise, lower stops part-way and keeps "
                                       "more of the image in edits (as KSampler's denoise)."),
                io.Boolean.Input("keep_trajectory", default=True,
                                 tooltip="Keep the latent at every step (one latent of memory per step). "
                                         "StochasticEditSampler needs it."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt; unconnected, a zeroed positive (as ConditioningZeroOut)."),
                *widgets.inputs(),
                # Appended after the method settings: a saved workflow holds widget values by position.
                io.Boolean.Input("measure", default=True, optional=True,
                                 tooltip="After inverting, sample back down the inversion's own schedule and show "
                                         "the round-trip error measured, what Reconstruct at the inversion's cfg "
                                         "returns (relative, the worst item). Costs one more model call per step "
                                         "(BDIA: steps - 1 in all; EDICT: 2 per step). Off: a first-order estimate "
                                         "from the residuals instead."),
            ],
            outputs=[io.Latent.Output(display_name="inverted", tooltip="The noise latent with its inversion record.")],
        )

    @classmethod
    def execute(cls, model, latent, positive, method, steps, scheduler, cfg, denoise, keep_trajectory,
                negative=None, measure=True, **settings):
        node = "Invert"
        samples = check_latent(node, latent, model)
        not_inverted(node, latent, "latent", "inverting noise again gives nothing to reconstruct or edit; connect the "
                                             "image's latent")
        no_noise_mask(node, latent, "latent", "it inverts the whole latent. Encode the image with VAEEncode and "
                                              "give the edit region to an editor's mask input")
        space = space_of(model, node)
        if method not in METHODS:
            fail(node, "method", f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if steps < 1:
            fail(node, "steps", f"expected at least 1, got {steps}")
        least = METHODS[method].resumer.min_steps
        if steps < least:
            fail(node, "steps", f"{method} needs at least {least} steps: with fewer its pair is the clean source, so "
                                "Reconstruct and the editors would return the source unchanged")
        if not 0 < denoise <= 1:
            fail(node, "denoise", f"expected a value in (0, 1], got {denoise}")
        check_cfg(node, "cfg", cfg)
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            fail(node, "scheduler", f"unknown scheduler {scheduler!r}")
        kwargs = widgets.values(method, settings)
        sigmas = sigmas_for(model, scheduler, steps, denoise)
        callback = progress(model, 2 * steps if measure else steps)  # progress counts steps, both ways

        def job(den, x, inner):
            inv = invert(method, den, x, sigmas, space=space, keep_trajectory=keep_trajectory, callback=callback, **kwargs)
            pair = to_vae(inner, inv.pair)
            measured, calls = None, [0]
            if measure:  # what Reconstruct returns from the LATENT this node outputs, against the source

                def counted(x, s):
                    calls[0] += 1
                    return den(x, s)
                start = replace(inv, latent=to_model(inner, to_vae(inner, inv.latent), x), pair=to_model(inner, pair, x))
                back = reconstruct(counted, start, callback=lambda d: callback(dict(d, i=d["i"] + steps)))
                measured = float(metrics.rel_error(samples, to_vae(inner, back)).max())
                del start, back
            traj = inv.trajectory
            if traj is not None:
                # In place, one latent at a time, so the solver's copy is freed as the LATENT's is made.
                # The ends are the source and the output; BDIA's pair is the state before the last.
                traj[0] = samples
                for i in range(1, len(traj) - 1):
                    traj[i] = pair if traj[i] is inv.pair else to_vae(inner, traj[i])
            return (inv, pair, measured, calls[0]), inv.latent

        (inv, pair, measured, calls), out = guided(node, model, positive, negative, cfg, samples, sigmas, job)
        if inv.trajectory is not None:
            inv.trajectory[-1] = out
        inv = replace(inv, latent=out, pair=pair, sigmas=inv.sigmas.detach().cpu())
        rec = Record(inv, source=samples, cfg=float(cfg), scheduler=scheduler, denoise=float(denoise),
                     model=describe(model), summary=summary(inv, measured, calls), roundtrip=measured)
        missed = measured is not None and measured > inv.settings.get("tol", float("inf"))
        logging.log(logging.WARNING if inv.unconverged or missed else logging.INFO, "Invert: %s", rec.summary)
        return io.NodeOutput(rec.into(latent), ui=ui.PreviewText(rec.summary))
