"""RF-Inversion: controlled inversion, then controlled sampling with the target (solvers/editing/rf_inversion.py)."""

import comfy.samplers
from comfy_api.latest import io

from ..solvers.editing.rf_inversion import ETA, GAMMA, edit_rf_inversion
from .host import latent_edit
from .host.inputs import SEEDS, cfg_input, fail
from .host.region import editor_inputs

NODE = "RFInversionEdit"


class RFInversionEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_RFInversionEdit",
            display_name="RF-Inversion Edit",
            category="sampling/inversion",
            description="Edits an image latent by RF-Inversion (Rout et al.): it inverts the image with the source "
                        "prompt along an ODE pulled towards a fixed, seeded noise (gamma), then samples with the "
                        "target prompt along an ODE pulled back towards the image (eta) over the steps from "
                        "start_step to stop_step. gamma 0 and eta 0 are plain inversion and sampling. Every family "
                        "(flow, EPS, v-prediction; image and video latents); an optional region (a MASK or the "
                        "edited words) keeps the image exactly outside it. Model calls: 2 per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded with the model's VAE."),
                io.Conditioning.Input("source", tooltip="The source prompt, for the inversion (an empty prompt works too)."),
                io.Conditioning.Input("target", tooltip="The edited prompt, for the sampling."),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Steps, each way."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="The host's scheduler, as in KSampler ('simple' for flow models)."),
                io.Float.Input("gamma", default=GAMMA, min=0.0, max=1.0, step=0.01,
                               tooltip="Pull of the inversion towards the seeded noise (the paper: 0.5); 0 is plain "
                                       "inversion."),
                io.Float.Input("eta", default=ETA, min=0.0, max=1.0, step=0.01,
                               tooltip="Pull of the sampling back towards the image over start_step to stop_step: "
                                       "higher keeps more of it (0 is plain sampling)."),
                io.Int.Input("start_step", default=0, min=0, max=1000,
                             tooltip="The first sampling step pulled towards the image."),
                io.Int.Input("stop_step", default=7, min=0, max=1000,
                             tooltip="The sampling step where the pull ends (not included): later keeps more of "
                                     "the image's layout, earlier edits more freely."),
                cfg_input("cfg_source", 1.0,
                          tooltip="Guidance while inverting; keep it low (Flux.1-dev: 1, and FluxGuidance 0 to "
                                  "1 on the source)."),
                cfg_input("cfg_target", 1.0,
                          tooltip="Guidance while sampling the target (Flux.1-dev: 1, and FluxGuidance about "
                                  "3.5 on the target; SD1.5/SDXL: 5 to 7.5)."),
                io.Int.Input("seed", default=0, min=0, max=SEEDS - 1, control_after_generate=True,
                             tooltip="Seed of the noise the inversion is pulled towards."),
                *editor_inputs(),
            ],
            outputs=latent_edit.outputs(),
        )

    @classmethod
    def execute(cls, model, latent, source, target, steps, scheduler, gamma, eta, start_step, stop_step, cfg_source,
                cfg_target, seed, **region):
        for name, v in (("gamma", gamma), ("eta", eta)):
            if not 0 <= v <= 1:
                fail(NODE, name, f"expected a value in [0, 1], got {v}")
        if not 0 <= stop_step <= steps:
            fail(NODE, "stop_step", f"expected a value from 0 to steps ({steps}), got {stop_step}")
        if not 0 <= start_step <= stop_step:
            fail(NODE, "start_step", f"expected a value from 0 to stop_step ({stop_step}), got {start_step}")

        def solve(edit_model, x, sigmas, mask, space, callback):
            return edit_rf_inversion(edit_model, x, sigmas, cfg_source, cfg_target, gamma=gamma, eta=eta,
                                     start=start_step, stop=stop_step, seed=seed, mask=mask, space=space,
                                     callback=callback)[0]

        return latent_edit.run(NODE, model, latent, source, target, steps, scheduler,
                               {"cfg_source": cfg_source, "cfg_target": cfg_target}, solve, passes=2, **region)
