"""Invert, Reconstruct and InversionSampler inside the real ComfyUI host."""

import copy

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch
from comfy_host import exact_model, prompt, run_invert, run_reconstruct, tiny_model, vae_scale

import comfy.sample
import comfy.samplers
from analytic import Mixture
from measure import rel
from inversion_suite.nodes.host import widgets
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.invert import Invert
from inversion_suite.nodes.reconstruct import Reconstruct
from inversion_suite.nodes.inversion_sampler import InversionSampler
from analytic import MixtureDenoiser, karras
from inversion_suite.solvers import METHODS, NonFiniteError
from inversion_suite.solvers import invert as solve

MIX = Mixture((4, 8, 8), components=3, seed=0)
KINDS = ("eps", "v", "flow")
SCHEDULER = {"eps": "karras", "v": "normal", "flow": "simple"}


def source(model, batch=2):
    return {"samples": vae_scale(model, MIX.sample(batch, seed=4).float())}


def invert(model, latent, kind, method, cfg=1.0, steps=10, negative=None, **settings):
    return run_invert(model, latent, prompt(1), method, steps, SCHEDULER[kind], cfg, negative=negative, **settings)


def reconstruct(model, inverted, cfg=-1.0, negative=None):
    return run_reconstruct(model, inverted, prompt(1), cfg, negative)


# Round-trip bounds measured at 10 steps, cfg 1, on the exact mixture (worst of the three
# model types, rounded up); BDIA, EDICT and tight AIDI-A are exact up to their tolerance.
BOUNDS = {"bdia": 1e-5, "edict": 1e-5, "aidi_anderson": 1e-4, "fixed_point": 1e-3, "aidi_empirical": 1e-3,
          "renoise": 0.1, "ddim": 0.6, "easyinv": 0.6, "naive_unsample": 0.6, "rf_solver": 0.05, "fireflow": 0.07}
TIGHT = {"aidi_anderson": dict(tol=1e-6, iterations=60), "fixed_point": dict(tol=1e-5, iterations=100),
         "aidi_empirical": dict(tol=1e-5, iterations=100)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_invert_then_reconstruct_returns_the_input(kind, method):
    model = exact_model(kind, MIX)
    latent = source(model)
    inverted = invert(model, latent, kind, method, **TIGHT.get(method, {}))
    rec = inverted["inversion"]
    assert rec["method"] == method and rec["nfe"] >= 10 and rec["unconverged"] == []
    # One latent per sigma of the record's schedule: the implicit methods may split steps.
    assert len(rec["trajectory"]) == len(rec["sigmas"]) >= 11 and torch.equal(rec["trajectory"][0], latent["samples"])
    out = reconstruct(model, inverted)
    err = rel(out["samples"], latent["samples"])
    print(f"{kind} {method}: round trip {err:.2e}, nfe {rec['nfe']}")
    assert err <= BOUNDS[method]
    assert rel(inverted["samples"], latent["samples"]) > 0.5  # it really went to noise


@pytest.mark.parametrize("kind", KINDS)
def test_exact_methods_on_a_real_network_with_guidance(kind):
    model = tiny_model(kind)
    latent = source(model)
    # A random network at cfg 3 amplifies float rounding (BDIA by 1/g_i, EDICT by 1/p per step)
    # far more than the smooth mixture; measured: BDIA up to 5e-5, EDICT up to 3e-4.
    for method, bound in (("bdia", 2e-4), ("edict", 1e-3)):
        inverted = invert(model, latent, kind, method, cfg=3.0, steps=8, negative=prompt(0))
        out = reconstruct(model, inverted, negative=prompt(0))
        err = rel(out["samples"], latent["samples"])
        print(f"{kind} {method} on a random network, cfg 3: {err:.2e}")
        assert err <= bound, method


def test_nodes_do_not_modify_their_inputs():
    model = exact_model("eps", MIX)
    latent = dict(source(model), batch_index=[0, 1])
    pos, neg = prompt(1), prompt(0)
    keep = copy.deepcopy((latent, pos, neg))
    inverted = Invert.execute(model=model, latent=latent, positive=pos, negative=neg, method="bdia", steps=6,
                              scheduler="karras", cfg=2.0, denoise=1.0, keep_trajectory=True).result[0]
    snapshot = copy.deepcopy(inverted)
    Reconstruct.execute(model=model, inverted=inverted, positive=pos, negative=neg, cfg=-1.0)
    for before, after in ((keep, (latent, pos, neg)), (snapshot, inverted)):
        assert_same(before, after)
    assert inverted["batch_index"] == [0, 1]


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_partial_denoise_inverts_part_way():
    model = exact_model("eps", MIX)
    latent = source(model)
    inverted = Invert.execute(model=model, latent=latent, positive=prompt(1), method="bdia", steps=6,
                              scheduler="karras", cfg=1.0, denoise=0.5, keep_trajectory=False).result[0]
    full = invert(model, latent, "eps", "bdia", steps=6)
    assert inverted["inversion"]["sigmas"][-1] < 0.5 * full["inversion"]["sigmas"][-1]
    assert inverted["inversion"]["trajectory"] is None
    assert rel(reconstruct(model, inverted)["samples"], latent["samples"]) <= 1e-5


# --- bad input, refused before any model evaluation -----------------------------------------

def counting(kind="eps"):
    return comfy_host.counted(exact_model(kind, MIX))


def test_bad_invert_inputs_are_refused_early():
    model, calls = counting()
    good = dict(model=model, latent=source(model), positive=prompt(1), method="ddim", steps=4, scheduler="karras",
                cfg=1.0, denoise=1.0, keep_trajectory=False)
    cases = [("latent", {"latent": {"samples": torch.zeros(1, 3, 8, 8)}}, "channels"),
             ("latent", {"latent": {"samples": torch.zeros(4, 8, 8)}}, "4D"),
             ("latent", {"latent": torch.zeros(1, 4, 8, 8)}, "LATENT"),
             ("latent", {"latent": {"samples": torch.full((1, 4, 8, 8), float("nan"))}}, "NaN"),
             ("method", {"method": "nope"}, "unknown"),
             ("steps", {"steps": 0}, "at least 1"),
             ("denoise", {"denoise": 0.0}, "(0, 1]"),
             ("positive", {"positive": "a cat"}, "CONDITIONING")]
    for what, change, words in cases:
        with pytest.raises(NodeInputError) as e:
            Invert.execute(**dict(good, **change))
        assert f"Invert: input '{what}'" in str(e.value) and words in str(e.value)
    with pytest.raises(ValueError, match="Invert: bdia: gamma"):
        Invert.execute(**dict(good, method="bdia", gamma=1.5))
    assert calls[0] == 0


def test_reconstruct_refuses_plain_and_mismatched_latents():
    eps, calls = counting("eps")
    flow = exact_model("flow", MIX)
    with pytest.raises(NodeInputError, match="carries no inversion"):
        reconstruct(eps, source(eps))
    inverted = invert(flow, source(flow), "flow", "ddim", steps=3)
    with pytest.raises(NodeInputError, match="made with a CONST model"):
        reconstruct(eps, inverted)
    bdia = invert(eps, source(eps), "eps", "bdia", steps=3)
    calls[0] = 0
    changed = dict(bdia, samples=bdia["samples"] * 1.01)
    with pytest.raises(NodeInputError, match="pair no longer"):
        reconstruct(eps, changed)
    rebuilt = {"samples": bdia["samples"]}  # what a node that rebuilds the dict leaves
    with pytest.raises(NodeInputError, match="carries no inversion"):
        reconstruct(eps, rebuilt)
    assert calls[0] == 0


def test_non_finite_model_output_names_method_and_step():
    model = exact_model("eps", MIX)
    model.set_model_unet_function_wrapper(lambda apply_model, args: torch.full_like(args["input"], float("nan")))
    with pytest.raises(FloatingPointError, match=r"Invert: aidi_anderson: .* step 1 "):
        invert(model, source(model), "eps", "aidi_anderson", steps=3)


# --- SAMPLER output -----------------------------------------------------------------------------

def test_sampler_output_matches_invert_through_the_host_ksampler():
    model = exact_model("eps", MIX)
    latent = source(model)
    node = invert(model, latent, "eps", "aidi_anderson", steps=6, **TIGHT["aidi_anderson"])
    sampler = InversionSampler.execute(method="aidi_anderson", **TIGHT["aidi_anderson"]).result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(prompt(1), [[torch.zeros(1, 77, comfy_host.CONTEXT), {}]])
    guider.set_cfg(1.0)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 6).flip(0)
    sigmas[0] = 1e-4  # as FlipSigmas leaves it
    zero = torch.zeros_like(latent["samples"])
    up = guider.sample(zero, latent["samples"], sampler, sigmas, disable_pbar=True, seed=0)
    assert rel(up, node["samples"]) <= 1e-6
    down = guider.sample(zero, up, sampler, comfy.samplers.calculate_sigmas(ms, "karras", 6), disable_pbar=True, seed=0)
    assert rel(down, latent["samples"]) <= 1e-4


def test_sampler_output_refuses_flow_up_to_sigma_one():
    model = exact_model("flow", MIX)
    sampler = InversionSampler.execute(method="ddim").result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(prompt(1), [[torch.zeros(1, 77, comfy_host.CONTEXT), {}]])
    guider.set_cfg(1.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).flip(0)
    sigmas[0] = 1e-4
    latent = source(model)["samples"]
    with pytest.raises(ValueError, match="use the Invert node"):
        guider.sample(torch.zeros_like(latent), latent, sampler, sigmas, disable_pbar=True, seed=0)


# Invert's widgets as version 0.1.0 laid them out: a saved workflow holds widget values by
# position, so every later setting must come after these (``Setting.added``).
RELEASED = ["model", "latent", "positive", "method", "steps", "scheduler", "cfg", "denoise", "keep_trajectory",
            "negative", "iterations", "tol", "guess", "m", "beta", "lam", "carry", "window_from", "window_to",
            "first_window_from", "first_window_to", "eta", "start", "end", "gamma", "p"]


def test_workflows_saved_by_the_first_release_keep_their_widget_positions():
    names = [i.id for i in Invert.define_schema().inputs]
    assert names[:len(RELEASED)] == RELEASED, names
    assert len(names) > len(RELEASED)  # settings added since then come after


@pytest.mark.parametrize("node", [Invert, InversionSampler])
def test_widgets_the_registry_and_the_solvers_agree(node):
    """A fresh node sends each method its registry defaults; each widget's range is its setting's
    range; the solver takes both ends of every range."""
    inputs = {i.id: i for i in node.define_schema().inputs}
    fresh = {k: getattr(i, "default", None) for k, i in inputs.items() if k != "method"}
    mix = Mixture((4, 8, 8), components=2, seed=1)
    for name in inputs["method"].options:
        m = METHODS[name]
        assert widgets.values(name, fresh) == m.defaults(), name
        for key, s in m.settings.items():
            w = widgets.widget_of(key, s)
            if s.choices:
                assert set(s.choices) <= set(inputs[w].options), (name, key)
            elif isinstance(s.default, tuple):
                assert all(inputs[f"{w}_{end}"].min == 0 for end in ("from", "to")), (name, key)
            else:
                assert (inputs[w].min, inputs[w].max) == (s.lo, s.hi), (name, key)
                for end in (s.lo, s.hi):  # the solver refuses nothing the widget offers
                    given = {key: type(s.default)(end)}
                    if name == "easyinv" and key in ("start", "end"):  # its window: start <= end, both in [0, 1]
                        given = {"start": float(end), "end": float(end)}
                    if name == "renoise" and key in ("iterations", "first_iterations"):  # windows within the calls
                        given.update(window=(0, 1), first_window=(0, 1))
                    try:
                        solve(name, MixtureDenoiser(mix, "eps"), mix.sample(1, seed=2), karras(2), space="eps", **given)
                    except NonFiniteError as e:  # a strong noise regularisation may diverge: said, by name and step
                        assert key in ("reg_steps", "lambda_ac", "lambda_kl") and f"{name}: the state became " \
                            "non-finite at step" in str(e), (name, key, end, e)


def test_a_widget_is_shared_only_by_settings_of_one_default_and_range():
    shared = {}
    for name, m in METHODS.items():
        for key, s in m.settings.items():
            shared.setdefault(widgets.widget_of(key, s), []).append(s)
    for w, specs in shared.items():
        # a choice may differ in its default: its widget offers 'auto', the selected method's own
        assert len({(None if s.choices else s.default, s.lo, s.hi, s.step, s.choices) for s in specs}) == 1, w
    assert widgets.widget_of("iterations", METHODS["renoise"].settings["iterations"]) == "renoise_iterations"
