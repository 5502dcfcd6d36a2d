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
    assert err <= rec["settings"]["tol"] == 3e-3  # the round-trip error the default asks for
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
    assert f"Round trip measured: {rec['roundtrip']:.1e} relative (the worst item, " in text
    assert "Raise iterations" in text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == f"Invert: {text}"]
    assert len(warned) == 1
    # What it could not do still reconstructs over its own schedule, exactly as far off as it said.
    out = Reconstruct.execute(model=model, inverted=inverted, positive=UNCOND, cfg=-1.0).result[0]
    assert abs(worst_rel(out["samples"], latent["samples"]) - rec["roundtrip"]) <= 1e-6 * rec["roundtrip"]
    # Not measured: the first-order estimate instead, and no figure recorded.
    _, _, unmeasured, estimated = invert("flow", iterations=3, tol=1e-6, measure=False)
    assert "Estimated reconstruction error" in estimated and unmeasured["inversion"]["roundtrip"] is None


def test_methods_without_residuals_say_so():
    model = exact_model("eps", SEPARATED)
    latent = {"samples": vae_scale(model, SEPARATED.sample(1, seed=10).float())}
    run = dict(model=model, latent=latent, positive=UNCOND, method="ddim", steps=4, scheduler="normal", cfg=1.0,
               denoise=1.0, keep_trajectory=False)
    measured = Invert.execute(**run)
    err = measured.result[0]["inversion"]["roundtrip"]
    assert measured.ui.value == f"ddim: 4 steps, 4 model calls. Round trip measured: {err:.1e} relative (the worst item, 4 more model calls)."
    assert Invert.execute(**run, measure=False).ui.value == ("ddim: 4 steps, 4 model calls; no residual is measured: "
                                                            "its error is its method's.")


def sampler_route(model, **settings):
    """An aidi_anderson InversionSampler (``settings``) under the host's unconditional CFG guider, and the
    host's ``normal`` schedule at 10 steps: descending, and flipped as FlipSigmas leaves it."""
    import comfy.samplers
    from inversion_suite.nodes.inversion_sampler import InversionSampler

    sampler = InversionSampler.execute(method="aidi_anderson", **settings).result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(UNCOND, UNCOND)
    guider.set_cfg(1.0)
    down = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 10)
    up = down.flip(0).clone()
    up[0] = 1e-4  # as FlipSigmas leaves it
    return sampler, guider, down, up


def test_the_sampler_route_samples_back_down_the_split_schedule():
    """InversionSampler through the host's KSAMPLER: the steps it splits while inverting are
    followed when it samples back down the host's schedule, so the round trip stays exact
    (on EPS, where the inversion splits steps on this mixture)."""
    model, latent, inverted, _ = invert("eps")
    assert len(inverted["inversion"]["sigmas"]) > 11  # the case splits steps
    sampler, guider, down, up = sampler_route(model)
    zero = torch.zeros_like(latent["samples"])
    steps = []
    noise = guider.sample(zero, latent["samples"], sampler, up, disable_pbar=True, seed=0)
    back = guider.sample(zero, noise, sampler, down, disable_pbar=True, seed=0,
                         callback=lambda i, x0, x, total: steps.append((i, total)))
    assert worst_rel(noise, inverted["samples"]) <= 1e-5
    assert worst_rel(back, latent["samples"]) <= 3e-3  # the default's round-trip target
    assert steps == [(i, 10) for i in range(10)]  # progress counts the host's steps


def test_one_sampler_keeps_each_inversions_split_schedule():
    """The host caches a SAMPLER and reuses it: a graph that inverts two latents on one schedule with
    one InversionSampler samples each noise back down its own split schedule (before, the second
    inversion's replaced the first's: round trip 3.9e-2 instead of 1.8e-4)."""
    import comfy.samplers

    model = exact_model("eps", SEPARATED)
    a = vae_scale(model, SEPARATED.sample(2, seed=10).float())
    b = torch.zeros_like(a)  # a latent whose inversion splits other steps (and fails: off the model's modes)
    sampler, guider, down, up = sampler_route(model)
    zero = torch.zeros_like(a)
    run = lambda x, s: guider.sample(zero, x, sampler, s, disable_pbar=True, seed=0)  # noqa: E731
    na = run(a, up)
    run(b, up)
    assert worst_rel(run(na, down), a) <= 3e-3
    # A latent no inversion returned samples down the host's schedule as given, as the host's Euler does.
    euler = guider.sample(zero, na + 1, comfy.samplers.sampler_object("euler"), down, disable_pbar=True, seed=0)
    assert worst_rel(run(na + 1, down), euler) <= 1e-5


def test_the_sampler_names_itself_in_a_solvers_refusal():
    from inversion_suite.solvers import SolverError

    model = exact_model("eps", SEPARATED)
    x = vae_scale(model, SEPARATED.sample(2, seed=10).float())
    sampler, guider, down, _ = sampler_route(model)
    with pytest.raises(SolverError, match=r"^InversionSampler: an inversion schedule starts at sigma = 0"):
        guider.sample(torch.zeros_like(x), x, sampler, down[:-3].flip(0), disable_pbar=True, seed=0)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_the_round_trip_shown_is_the_one_reconstruct_gives_through_the_executor(kind, cfg, monkeypatch):
    """A graph Invert -> Reconstruct run by the host's executor: the error Invert shows and records is
    the one Reconstruct's output has, to 1e-6 relative (cfg 3 with a negative prompt)."""
    import utils.extra_config  # noqa: F401 (before the host's nodes.py, as main.py does)
    import nodes as core
    from inversion_suite.nodes import NODES

    model = exact_model(kind, SEPARATED)
    latent = {"samples": vae_scale(model, SEPARATED.sample(2, seed=10).float())}
    positive, negative = comfy_host.prompt(1), comfy_host.prompt(2)
    kept = {}

    class Inputs:
        CATEGORY, FUNCTION = "test", "run"
        RETURN_TYPES = ("MODEL", "LATENT", "CONDITIONING", "CONDITIONING")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return model, latent, positive, negative

    class Keep:
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "test", "run", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"inverted": ("LATENT",), "back": ("LATENT",)}}

        def run(self, inverted, back):
            kept.update(inverted=inverted, back=back)
            return {}

    for cls in NODES:
        monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, cls.GET_SCHEMA().node_id, cls)
    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestInputs", Inputs)
    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestKeep", Keep)
    neg = {"negative": ["1", 3]} if cfg > 1 else {}
    graph = {"1": {"class_type": "TestInputs", "inputs": {}},
             "2": {"class_type": "InversionSuite_Invert",
                   "inputs": {"model": ["1", 0], "latent": ["1", 1], "positive": ["1", 2], "method": "aidi_anderson",
                              "steps": 10, "scheduler": SCHEDULER[kind], "cfg": cfg, "denoise": 1.0,
                              "keep_trajectory": False, **neg}},
             "3": {"class_type": "InversionSuite_Reconstruct",
                   "inputs": {"model": ["1", 0], "inverted": ["2", 0], "positive": ["1", 2], "cfg": -1.0, **neg}},
             "4": {"class_type": "TestKeep", "inputs": {"inverted": ["2", 0], "back": ["3", 0]}}}
    ex = comfy_host.execute_graph(graph)
    assert ex.success, ex.status_messages
    shown = kept["inverted"]["inversion"]["roundtrip"]
    err = worst_rel(kept["back"]["samples"], latent["samples"])
    print(f"{kind} cfg {cfg}: shown {shown:.3e}, Reconstruct {err:.3e}")
    assert abs(shown - err) <= 1e-6 * err
    text = ex.history_result["outputs"]["2"]["text"][0]
    assert f"Round trip measured: {err:.1e} relative" in text


def real_server(tmp_path, monkeypatch):
    """The host's own PromptServer, built in this process (its user folder under ``tmp_path``), as main.py
    builds it, until the test ends; what nodes send it queues in ``messages``."""
    import asyncio
    import importlib
    import sys

    import folder_paths
    monkeypatch.setattr(folder_paths, "user_directory", folder_paths.get_user_directory())
    folder_paths.set_user_directory(str(tmp_path))
    # The host's nodes.py puts comfy/ first on the path, where utils.py hides the host's utils package that
    # server.py needs; main.py imports that package before nodes.py, so do so here.
    if "install_util" not in getattr(sys.modules.get("utils"), "__dict__", {}):
        sys.modules.pop("utils", None)
        sys.path.insert(0, str(comfy_host.path()))
        try:
            importlib.import_module("utils.install_util")
        finally:
            sys.path.remove(str(comfy_host.path()))
    import server
    monkeypatch.delattr(server.PromptServer, "instance", raising=False)  # back to none when the test ends
    return server.PromptServer(asyncio.new_event_loop())


def test_the_sampler_shows_its_summary_on_the_node_that_runs_it(tmp_path, monkeypatch):
    """A SAMPLER has no node of its own on screen: its summary (calls, unconverged steps) goes to the
    host's sampling node as that node's progress text, through the host's server."""
    import asyncio
    import struct

    from comfy_execution.utils import CurrentNodeContext

    server = real_server(tmp_path, monkeypatch)
    model = exact_model("eps", SEPARATED)
    x = vae_scale(model, SEPARATED.sample(2, seed=10).float())
    for iterations, words in ((16, "every step converged"), (2, "did NOT converge")):
        sampler, guider, _, up = sampler_route(model, iterations=iterations)
        with CurrentNodeContext("p", "42"):
            guider.sample(torch.zeros_like(x), x, sampler, up, disable_pbar=True, seed=0)
        server.loop.run_until_complete(asyncio.sleep(0))  # the server queues what it is sent on its loop
        texts = []
        while not server.messages.empty():
            event, data, _ = server.messages.get_nowait()
            if isinstance(data, (bytes, bytearray)):
                n = struct.unpack(">I", data[:4])[0]
                texts.append((data[4:4 + n].decode(), data[4 + n:].decode()))
        assert len(texts) == 1 and texts[0][0] == "42", texts
        assert texts[0][1].startswith("InversionSampler: aidi_anderson: 10 steps") and words in texts[0][1], texts
