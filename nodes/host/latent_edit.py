"""The shared run of the editors that take a plain image latent (no inversion): FlowEdit and RF-Inversion.

Their inputs end as every editor's do (``region.editor_inputs``) and their runs alike: the
checks every such node makes, the region (optional: without one the whole image may change),
the two-prompt guider, the solver under the host's guider, and the LATENT and MASK it returns.
"""

import comfy.samplers
from comfy_api.latest import io

from . import edit_guider
from .inputs import check_cfg, fail, no_noise_mask
from .model import check_latent, space_of
from .record import not_inverted
from .region import NOISE_MASK, Region
from .run import progress, run_guider, sigmas_for


def outputs():
    return [io.Latent.Output(display_name="edited", tooltip="The edited latent."),
            io.Mask.Output(display_name="mask", tooltip="The edit region used, at image size (all white without a "
                                                        "region).")]


def run(node, model, latent, source, target, steps, scheduler, cfgs: dict, solve, passes=1, negative=None,
        **region):
    """Check the shared inputs, then ``solve(edit_model, x, sigmas, region, space, callback) -> latent``
    under the host's guider; returns the node's output. ``passes``: how often the solver walks the
    schedule (for the progress bar)."""
    samples = check_latent(node, latent, model)
    not_inverted(node, latent, "latent", "this editor starts from the image itself; connect the latent Invert was given")
    no_noise_mask(node, latent, "latent", NOISE_MASK)
    space = space_of(model, node)
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        fail(node, "scheduler", f"unknown scheduler {scheduler!r}")
    for name, w in cfgs.items():
        check_cfg(node, name, w)
    region = Region(node, model, samples, region, required=False)
    sigmas = sigmas_for(model, scheduler, steps, 1.0).flip(0)
    callback, shown = region.watch(progress(model, passes * steps))
    g = edit_guider.build(node, region.attach(model), region.capture, source, target, negative)

    def job(den, x, inner):
        return None, solve(g.model(den), x, sigmas, region.spec, space, callback)

    _, out = run_guider(node, g, samples, sigmas, job)
    result = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    result["samples"] = out
    return io.NodeOutput(result, shown(model))
