"""Invert's convergence summary and step splitting inside the real ComfyUI host.

The mixture of well-separated components (see test_convergence.py), unconditional, so the
denoiser switches between all four modes; the host's own schedules: SD1.5 ``normal``
for EPS and v-prediction, ``simple`` with shift 3 for flow, 10 steps.
"""

import logging

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch
from comfy_host import exact_model, vae_scale

from analytic import Mixture
from measure import worst_rel
from inversion_suite.nodes.invert import Invert
from inversion_suite.nodes.reconstruct import Reconstruct

SEPARATED = Mixture((4, 8, 8), components=4, seed=0, spread=3.0, var_range=(0.01, 0.05))
SCHEDULER = {"eps": "normal", "v": "normal", "flow": "simple"}
UNCOND = [[torch.zeros(1, 77, comfy_host.CONTEXT), {}]]  # label -1 in exact_model: every component


def invert(kind, **settings):
    model = exact_model(kind, SEPARATED)
    latent = {"samples": vae_scale(model, SEPARATED.sample(2, seed=10).float())}
    out = Invert.execute(model=model, latent=latent, positive=UNCOND, method="aidi_anderson", steps=10,
                         scheduler=SCHEDULER[kind], cfg=1.0, denoise=1.0, keep_trajectory=False, **settings)
    return model, latent, out.result[0], out.ui.value


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_separated_modes_round_trip_at_the_defaults(kind, caplog):
    with caplog.at_level(logging.INFO):
        model, latent, inverted, text = invert(kind)
    rec = inverted["inversion"]
    out = Reconstruct.execute(model=model, inverted=inverted, positive=UNCOND, cfg=-1.0).result[0]
    err = worst_rel(out["samples"], latent["samples"])
    print(f"{kind}: rel {err:.1e}; {text}")
    assert err <= 1e-4
    assert rec["unconverged"] == [] and rec["budget"] == 160 and rec["nfe"] <= 160 and rec["steps"] == 10  # the node's steps; split ones are in sigmas
    # The record's schedule is the one sampled: split steps are in it, one residual each.
    assert len(rec["sigmas"]) - 1 == len(rec["residuals"]) == len(rec["costs"]) >= 10
    assert rec["summary"] == text and text.startswith("aidi_anderson: 10 steps") and "every step converged" in text
    assert f"{rec['nfe']} model calls (budget 160)" in text
    assert any(r.levelno == logging.INFO and r.getMessage() == f"Invert: {text}" for r in caplog.records)


def test_a_tiny_budget_is_reported_on_the_node(caplog):
    with caplog.at_level(logging.INFO):
        model, latent, inverted, text = invert("flow", iterations=3, tol=1e-6)
    rec = inverted["inversion"]
    bad = rec["unconverged"]
    assert bad and rec["nfe"] <= 30
    assert f"{len(bad)} of {len(rec['sigmas']) - 1} steps did NOT converge to tol 1e-06" in text
    worst = max(bad, key=rec["residuals"].__getitem__)
    assert f"the worst, step {worst + 1} " in text  # 1-based, as progress counts and f"residual {rec['residuals'][worst]:.1e}" in text
    assert "Estimated reconstruction error" in text and "Raise iterations" in text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == f"Invert: {text}"]
    assert len(warned) == 1
    # What it could not do still reconstructs over its own schedule, within what it reported.
    out = Reconstruct.execute(model=model, inverted=inverted, positive=UNCOND, cfg=-1.0).result[0]
    assert torch.isfinite(out["samples"]).all()


def test_methods_without_residuals_say_so():
    model = exact_model("eps", SEPARATED)
    latent = {"samples": vae_scale(model, SEPARATED.sample(1, seed=10).float())}
    out = Invert.execute(model=model, latent=latent, positive=UNCOND, method="ddim", steps=4, scheduler="normal",
                         cfg=1.0, denoise=1.0, keep_trajectory=False)
    assert out.ui.value == "ddim: 4 steps, 4 model calls; no residual is measured: its error is its method's."


def test_the_sampler_route_samples_back_down_the_split_schedule():
    """InversionSampler through the host's KSAMPLER: the steps it splits while inverting are
    followed when it samples back down the host's schedule, so the round trip stays exact
    (on EPS, where the inversion splits steps on this mixture)."""
    import comfy.samplers
    from inversion_suite.nodes.inversion_sampler import InversionSampler

    model, latent, inverted, _ = invert("eps")
    assert len(inverted["inversion"]["sigmas"]) > 11  # the case splits steps
    sampler = InversionSampler.execute(method="aidi_anderson").result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(UNCOND, UNCOND)
    guider.set_cfg(1.0)
    down = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 10)
    up = down.flip(0).clone()
    up[0] = 1e-4  # as FlipSigmas leaves it
    zero = torch.zeros_like(latent["samples"])
    steps = []
    noise = guider.sample(zero, latent["samples"], sampler, up, disable_pbar=True, seed=0)
    back = guider.sample(zero, noise, sampler, down, disable_pbar=True, seed=0,
                         callback=lambda i, x0, x, total: steps.append((i, total)))
    assert worst_rel(noise, inverted["samples"]) <= 1e-5
    assert worst_rel(back, latent["samples"]) <= 1e-4
    assert steps == [(i, 10) for i in range(10)]  # progress counts the host's steps
