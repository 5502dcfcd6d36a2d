"""FlowEdit: edit an image latent with a new prompt, no inversion (solvers/editing/flowedit.py)."""

import comfy.samplers
from comfy_api.latest import io

from ..solvers.editing.flowedit import edit_flowedit
from .host import latent_edit
from .host.inputs import SEEDS, cfg_input, fail
from .host.region import editor_inputs

NODE = "FlowEdit"
NOISE = ("antithetic", "independent")  # the pack's pairing (solvers/editing/flowedit.py), the paper's draws
COMPOSITE = ("at the end", "every step")  # the solver's paste, and the region weighing each step


class FlowEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_FlowEdit",
            display_name="Edit with FlowEdit",
            category="sampling/inversion",
            description="Edits an image latent with a target prompt without inverting it (Kulikov et al., "
                        "FlowEdit): over the last n_max steps it integrates the difference of the target's and the "
                        "source's predictions, each taken on a noised copy of the image, so what both "
                        "prompts agree on stays; by default consecutive steps take opposite noises (antithetic), "
                        "which keeps more of the layout than the paper's fresh draws at the same cost. Runs on "
                        "every family (flow, EPS, v-prediction; image and video latents). An optional region (a "
                        "MASK or the edited words' attention) limits the edit: outside it the image is kept exactly. "
                        "Model calls: 2 x n_avg per edited step, 1 per plain one.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded with the model's VAE (not an Invert "
                                                  "output: FlowEdit needs no inversion)."),
                io.Conditioning.Input("source", tooltip="The source prompt: a description of the image as it is."),
                io.Conditioning.Input("target", tooltip="The edited prompt."),
                io.Int.Input("steps", default=28, min=1, max=1000,
                             tooltip="Steps of the schedule; the edit runs over its last n_max (FlowEdit's Flux "
                                     "setting: 28 and 24; SD3: 50 and 33)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="The host's scheduler, as in KSampler ('simple' for flow models)."),
                io.Int.Input("n_max", default=24, min=1, max=1000,
                             tooltip="How many of the last steps edit: more changes more of the image's layout."),
                io.Int.Input("n_min", default=0, min=0, max=1000,
                             tooltip="The last n_min steps sample the target plainly instead (adds detail; "
                                     "0 in the paper's defaults)."),
                io.Int.Input("n_avg", default=1, min=1, max=16,
                             tooltip="Noise draws averaged per step (each costs 2 model calls)."),
                io.Combo.Input("noise", options=list(NOISE), default=NOISE[0],
                               tooltip="antithetic: every second edited step reuses the step before's noise draws "
                                       "negated, so their random errors cancel instead of adding up; it keeps more "
                                       "of the image's layout at the same edit strength, at no extra model call "
                                       "(the pack's edit benchmark). independent: a fresh draw every step, as in the "
                                       "paper."),
                io.Combo.Input("composite", options=list(COMPOSITE), default=COMPOSITE[0],
                               tooltip="How a region limits the edit. at the end: the whole latent is edited, then "
                                       "composited into the region (feathered by 'feather'), so the edit is made "
                                       "with its edited surroundings in view: stronger, and no seam with the "
                                       "default feather. every step: each step's change is weighed by the region, "
                                       "so the edit sees the untouched surroundings: weaker (grow applies here "
                                       "only). Outside the region the image is kept exactly either way."),
                cfg_input("cfg_source", 1.0,
                          tooltip="Classifier-free guidance of the source prompt. Guidance-distilled models "
                                  "(Flux.1-dev): keep 1 and set FluxGuidance on each prompt instead (the "
                                  "paper: 1.5 source, 5.5 target). SD3: the paper's 3.5."),
                cfg_input("cfg_target", 1.0,
                          tooltip="Classifier-free guidance of the target prompt: higher edits more strongly. "
                                  "Flux.1-dev: keep 1 (FluxGuidance 5.5 on the target). SD3: the paper's 13.5; "
                                  "SD1.5/SDXL: 5 to 7.5."),
                io.Int.Input("seed", default=0, min=0, max=SEEDS - 1, control_after_generate=True,
                             tooltip="Seed of the noise draws: a seed always gives the same edit."),
                *editor_inputs(),
            ],
            outputs=latent_edit.outputs(),
        )

    @classmethod
    def execute(cls, model, latent, source, target, steps, scheduler, n_max, n_min, n_avg, noise, composite,
                cfg_source, cfg_target, seed, **region):
        if not 1 <= n_max <= steps:
            fail(NODE, "n_max", f"expected a value from 1 to steps ({steps}), got {n_max}")
        if not 0 <= n_min <= n_max:
            fail(NODE, "n_min", f"expected a value from 0 to n_max ({n_max}), got {n_min}")
        if n_avg < 1:
            fail(NODE, "n_avg", f"expected at least 1, got {n_avg}")
        if noise not in NOISE:
            fail(NODE, "noise", f"expected one of {', '.join(NOISE)}, got {noise!r}")
        if composite not in COMPOSITE:
            fail(NODE, "composite", f"expected one of {', '.join(COMPOSITE)}, got {composite!r}")

        def solve(edit_model, x, sigmas, mask, space, callback):
            return edit_flowedit(edit_model, x, sigmas, cfg_source, cfg_target, n_min=n_min, n_max=n_max, n_avg=n_avg,
                                 seed=seed, antithetic=noise == NOISE[0],
                                 paste=composite == COMPOSITE[0], mask=mask, space=space,
                                 callback=callback)[0]

        return latent_edit.run(NODE, model, latent, source, target, steps, scheduler,
                               {"cfg_source": cfg_source, "cfg_target": cfg_target}, solve, **region)
