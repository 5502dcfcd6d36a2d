"""Solver tests against denoisers whose right answer is known in closed form.

A Gaussian mixture gives an exact, nonlinear denoiser; a single Gaussian also gives the
exact probability-flow ODE. Every check runs in both spaces.
"""

import dataclasses
import math

import pytest
import torch

from analytic import Mixture, MixtureDenoiser, gaussian_flow, karras, uniform_flow
from measure import rel
from inversion_suite.solvers import (DEFAULT, METHODS, SAMPLERS, Inversion, NonFiniteError, SolverError, check_record,
                                     invert, reconstruct)
from inversion_suite.solvers.record import FORMAT, MAX_STEPS
from inversion_suite.solvers.registry import check_settings, resolve
from inversion_suite.solvers.methods.bdia import sample_bdia
from inversion_suite.solvers.methods.edict import sample_edict
from inversion_suite.solvers.methods.euler import sample_euler
from inversion_suite.solvers.methods.fireflow import sample_fireflow
from inversion_suite.solvers.methods.rf_solver import sample_rf_solver

SPACES = ("eps", "flow")
LABELS = {"label": [0, 1, 2], "cfg": 1.0}
MIX = Mixture((4, 8, 8), components=4, seed=0)


def schedule(space, steps):
    return karras(steps) if space == "eps" else uniform_flow(steps)


def data(dtype=torch.float32, batch=3):
    return MIX.sample(batch, seed=3).to(dtype)


def roundtrip(name, space, steps, x=None, extra=LABELS, **settings):
    x = data() if x is None else x
    den = MixtureDenoiser(MIX, space)
    inv = invert(name, den, x, schedule(space, steps), extra, space=space, **settings)
    return inv, rel(reconstruct(den, inv, extra), x)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("steps", [10, 50])
def test_bdia_is_exact(space, steps):
    inv, err = roundtrip("bdia", space, steps)
    assert err <= 1e-5
    assert inv.nfe == steps and inv.pair is not None
    _, err64 = roundtrip("bdia", space, steps, x=data(torch.float64))
    assert err64 <= 1e-13  # float64 reaches ~1e-15: the method itself is exact


@pytest.mark.parametrize("space", SPACES)
def test_edict_is_exact(space):
    inv, err = roundtrip("edict", space, 10)
    assert err <= 1e-5 and inv.nfe == 20


@pytest.mark.parametrize("space", SPACES)
def test_anderson_tight_tolerance_reconstructs(space):
    inv, err = roundtrip("aidi_anderson", space, 10, tol=1e-6, iterations=50)
    assert err <= 1e-4
    assert inv.unconverged == [] and max(inv.residuals) < 1e-6


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("guess", ["ddim", "extrapolate"])
def test_anderson_needs_fewer_calls_than_fixed_point(space, guess):
    plain, err_plain = roundtrip("fixed_point", space, 10, tol=1e-5, iterations=100, guess=guess)
    fast, err_fast = roundtrip("aidi_anderson", space, 10, tol=1e-5, iterations=100, guess=guess)
    assert plain.unconverged == [] and fast.unconverged == []
    assert fast.nfe < plain.nfe, (fast.nfe, plain.nfe)
    assert err_fast <= 1e-4 and err_plain <= 1e-3


@pytest.mark.parametrize("name", ["fixed_point", "aidi_anderson", "aidi_empirical"])
def test_budget_is_kept_and_unsolved_steps_reported(name):
    # The call budget (iterations x steps) is a hard cap; a tolerance out of float32's reach
    # leaves steps unsolved, each listed with its residual.
    inv, _ = roundtrip(name, "flow", 10, tol=1e-8, iterations=3)
    assert inv.unconverged, "steps that did not reach tol must be listed"
    assert len(inv.residuals) == inv.steps == len(inv.sigmas) - 1 >= 10
    assert all(inv.residuals[i] >= 1e-8 for i in inv.unconverged)
    assert inv.budget == 30 and inv.nfe <= 30


@pytest.mark.parametrize("space", SPACES)
def test_empirical_acceleration_converges(space):
    inv, err = roundtrip("aidi_empirical", space, 10, tol=1e-6, iterations=100)
    assert inv.unconverged == [] and err <= 1e-3


def gaussian_order(name, space, top):
    """Observed order of the inversion's error against the exact ODE, halving the step."""
    single = Mixture((2, 4, 4), components=1, seed=5)
    x = single.sample(2, seed=7)
    errs = []
    for n in (16, 32, 64):
        sig = torch.linspace(0, top, n + 1, dtype=torch.float64)
        inv = invert(name, MixtureDenoiser(single, space), x, sig, space=space)
        exact = gaussian_flow(x, 0.0, top, single.mu[0], single.var[0], space)
        errs.append(rel(inv.latent, exact))
    return [math.log2(errs[i] / errs[i + 1]) for i in range(2)], errs


@pytest.mark.parametrize("space,top", [("eps", 2.0), ("flow", 0.9)])
@pytest.mark.parametrize("name", ["ddim", "naive_unsample"])
def test_explicit_inversions_are_first_order(name, space, top):
    orders, errs = gaussian_order(name, space, top)
    assert all(0.85 < p < 1.15 for p in orders), (orders, errs)


@pytest.mark.parametrize("space", SPACES)
def test_error_shrinks_with_steps(space):
    errs = [roundtrip("ddim", space, n)[1] for n in (10, 20, 50)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("space", SPACES)
def test_naive_and_ddim_side_by_side(space):
    # Not ordered: on a mixture with a Karras schedule naive unsampling can win. Both are
    # first-order and distinct: from 10 to 50 steps each error falls by 3x or more (about 4.3x
    # measured), and at each count the two differ by more than 5%.
    err = {name: [roundtrip(name, space, n)[1] for n in (10, 50)] for name in ("ddim", "naive_unsample")}
    for name, (coarse, fine) in err.items():
        assert fine * 3 <= coarse, (name, coarse, fine)
    for a, b in zip(err["ddim"], err["naive_unsample"]):
        assert abs(a - b) > 0.05 * max(a, b), (a, b)


@pytest.mark.parametrize("space", SPACES)
def test_easyinv_at_eta_one_is_ddim(space):
    a, _ = roundtrip("ddim", space, 20)
    b, _ = roundtrip("easyinv", space, 20, eta=1.0, start=0.0, end=1.0)
    assert torch.equal(a.latent, b.latent)
    c, _ = roundtrip("easyinv", space, 20, eta=0.5, start=0.0, end=1.0)
    assert not torch.equal(a.latent, c.latent)


@pytest.mark.parametrize("space", SPACES)
def test_renoise_single_iteration_is_ddim(space):
    a, _ = roundtrip("ddim", space, 20)
    b, _ = roundtrip("renoise", space, 20, iterations=1, window=(0, 1), first_window=(0, 1))
    assert torch.equal(a.latent, b.latent) and b.nfe == a.nfe


@pytest.mark.parametrize("space", SPACES)
def test_renoise_improves_on_ddim(space):
    assert roundtrip("renoise", space, 20, iterations=6)[1] < 0.5 * roundtrip("ddim", space, 20)[1]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("space", SPACES)
def test_nfe_is_the_true_call_count(name, space):
    den = MixtureDenoiser(MIX, space)
    inv = invert(name, den, data(), schedule(space, 7), LABELS, space=space)
    assert inv.nfe == den.calls > 0
    calls = den.calls
    reconstruct(den, inv, LABELS)
    # Sampling back takes one call per step of the inversion's schedule, split steps included.
    assert den.calls - calls == {"bdia": 6, "edict": 14, "rf_solver": 14, "fireflow": 8}.get(name, inv.steps)
    assert inv.steps >= 7 and inv.nfe == {"rf_solver": 14, "fireflow": 8}.get(name, inv.nfe)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_5d_latents_and_keeps_inputs(name):
    video = Mixture((2, 3, 4, 4), components=2, seed=1)
    x = video.sample(2, seed=2).float()
    before = x.clone()
    den = MixtureDenoiser(video, "eps")
    steps = []
    inv = invert(name, den, x, karras(6), space="eps", keep_trajectory=True, callback=lambda d: steps.append(d["i"]))
    assert steps == list(range(6))
    assert torch.equal(x, before)
    assert inv.latent.shape == x.shape and len(inv.trajectory) == inv.steps + 1 >= 7
    assert torch.equal(inv.trajectory[0], x) and torch.equal(inv.trajectory[-1], inv.latent)
    assert inv.sampler in SAMPLERS
    assert torch.isfinite(reconstruct(den, inv)).all()


def test_half_precision_model_keeps_float32_arithmetic():
    den = MixtureDenoiser(MIX, "flow", dtype=torch.float16)
    for name in ("aidi_anderson", "bdia", "easyinv"):
        inv = invert(name, den, data(), uniform_flow(8), LABELS, space="flow")
        assert inv.latent.dtype == torch.float32
        assert reconstruct(den, inv, LABELS).dtype == torch.float32


def test_batch_items_are_independent():
    x = data()
    den = MixtureDenoiser(MIX, "eps")
    whole = invert("bdia", den, x, karras(10), LABELS).latent
    for i in range(3):
        one = invert("bdia", den, x[i:i + 1], karras(10), {"label": [LABELS["label"][i]], "cfg": 1.0}).latent
        assert torch.allclose(one[0], whole[i], rtol=1e-6, atol=1e-6)


def test_guidance_changes_and_round_trips():
    x = data()
    one = roundtrip("bdia", "flow", 10, x=x)
    three = roundtrip("bdia", "flow", 10, x=x, extra={"label": [0, 1, 2], "cfg": 3.0})
    assert three[1] <= 1e-5
    assert not torch.allclose(one[0].latent, three[0].latent)


def test_the_default_method_is_a_registered_single_state_method():
    assert DEFAULT in METHODS and METHODS[DEFAULT].resumer.states == 1
    inv, err = roundtrip(DEFAULT, "eps", 10)
    assert inv.pair is None and err <= 1e-2


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_bad_schedules_are_refused_before_any_call(name):
    den = MixtureDenoiser(MIX, "eps")
    for bad in ([0.0, 2.0, 1.0], [0.0], [0.5, 1.0, 2.0], [0.0, float("nan")]):
        with pytest.raises(SolverError):
            invert(name, den, data(), bad)
    assert den.calls == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_bad_latents_are_refused(name):
    den = MixtureDenoiser(MIX, "eps")
    for bad in (torch.zeros(4, 8, 8), torch.zeros(1, 4, 8, 8, dtype=torch.int64), torch.full((1, 4, 8, 8), float("inf"))):
        with pytest.raises(SolverError):
            invert(name, den, bad, karras(4))
    assert den.calls == 0


def test_bad_settings_are_refused():
    den = MixtureDenoiser(MIX, "eps")
    cases = [("unknown_method", {}), ("ddim", {"gamma": 0.9}), ("bdia", {"gamma": 0.0}), ("bdia", {"gamma": 1.5}),
             ("aidi_anderson", {"m": 0}), ("aidi_anderson", {"beta": 0.0}), ("fixed_point", {"iterations": 0}),
             ("fixed_point", {"tol": 0.0}), ("fixed_point", {"guess": "nope"}), ("easyinv", {"eta": 0.0}),
             ("easyinv", {"start": 0.5, "end": 0.2}), ("renoise", {"window": (3, 1)}), ("edict", {"p": 0.0})]
    for name, settings in cases:
        with pytest.raises(SolverError):
            invert(name, den, data(), karras(4), **settings)
    assert den.calls == 0


@pytest.mark.parametrize("name,settings,words", [
    ("bdia", {"gamma": 0.3}, "gamma must be a number from 0.5 to 1.0, got 0.3"),
    ("edict", {"p": 0.2}, "p must be a number from 0.5 to 1.0, got 0.2"),
    ("aidi_anderson", {"iterations": 500}, "iterations must be an integer from 2 to 100, got 500"),
    ("aidi_anderson", {"m": 50}, "m must be an integer from 1 to 10, got 50"),
    ("fixed_point", {"iterations": 2.9}, "iterations must be an integer from 2 to 100, got 2.9"),
    ("renoise", {"window": (1.9, 3.7)}, r"window must be 2 integers >= 0, got \(1.9, 3.7\)"),
    ("renoise", {"window": (3, 5, 7)}, "window must be 2 integers >= 0"),
    ("fixed_point", {"guess": "newton"}, "guess must be one of ddim, extrapolate"),
    ("easyinv", {"eta": True}, "eta must be a number from 0.01 to 1.0, got True"),
    ("aidi_anderson", {"tol": float("nan")}, "tol must be a number from 1e-08 to 0.1, got nan")])
def test_settings_outside_the_registry_are_refused_before_any_call(name, settings, words):
    den = MixtureDenoiser(MIX, "eps")
    with pytest.raises(SolverError, match=rf"^{name}: {words}"):
        invert(name, den, data(), karras(4), space="eps", **settings)
    assert den.calls == 0


def test_every_registry_default_and_range_end_is_accepted_and_recorded_as_given():
    for name, m in METHODS.items():
        assert resolve(name, m.defaults()) == resolve(name, {})
        check_settings(name, resolve(name, {}))
        for key, s in m.settings.items():
            for v in (s.lo, s.hi) if s.lo is not None else ():
                check_settings(name, resolve(name, {key: v}))
    inv = invert("fixed_point", MixtureDenoiser(MIX, "eps"), data(), karras(4), space="eps", iterations=3.0,
                 tol=1e-4)
    assert type(inv.settings["iterations"]) is int and inv.settings["iterations"] == 3 and inv.budget == 12
    # the methods' own guards, for direct callers and the records' samplers, hold the registry's range
    den, x = MixtureDenoiser(MIX, "eps"), data()
    for fn, key, extra in ((sample_bdia, "gamma", {}), (sample_edict, "p", {"order": "leapfrog"})):
        lo, calls = METHODS[fn.__name__[len("sample_"):]].settings[key].lo, den.calls
        with pytest.raises(SolverError, match=f"{key} must be from {lo}"):
            fn(den, x, karras(4).flip(0), space="eps", **{key: lo - 0.01}, **extra)
        assert den.calls == calls
        fn(den, x, karras(4).flip(0), space="eps", **{key: lo}, **extra)
        assert den.calls > calls


def test_a_pair_given_to_a_single_state_sampler_is_refused_and_a_pair_takes_the_work_dtype():
    den, x = MixtureDenoiser(MIX, "eps"), data()
    for fn in (sample_euler, sample_rf_solver, sample_fireflow):
        with pytest.raises(SolverError, match="resumes from one state, but a pair state was given"):
            fn(den, x, karras(4).flip(0), space="eps", pair=x)
    assert den.calls == 0
    for name in ("bdia", "edict"):
        inv = invert(name, den, x, karras(4), space="eps")
        fn, kw = SAMPLERS[name].sample, {k: inv.settings[k] for k in SAMPLERS[name].settings}
        full = fn(den, inv.latent, inv.sigmas.flip(0), space="eps", pair=inv.pair.half().float(), **kw)
        half = fn(den, inv.latent, inv.sigmas.flip(0), space="eps", pair=inv.pair.half(), **kw)
        assert half.dtype == torch.float32 and torch.equal(half, full)


def test_mismatched_shapes_are_refused():
    x = data()
    with pytest.raises(SolverError, match="shape"):
        invert("ddim", lambda x, s, **k: x[:, :2], x, karras(4))
    den = MixtureDenoiser(MIX, "eps")
    with pytest.raises(SolverError, match="pair"):
        sample_bdia(den, x, karras(4).flip(0), space="eps", pair=x[:1], gamma=0.94)
    with pytest.raises(SolverError, match="pair"):
        sample_edict(den, x, karras(4).flip(0), space="eps", pair=x[:, :2], p=0.93, order="leapfrog")
    with pytest.raises(SolverError, match="descending"):
        sample_euler(den, x, karras(4), space="eps")


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_denoiser_names_method_and_step(name, bad):
    den = MixtureDenoiser(MIX, "eps")
    calls = [0]

    def broken(x, sigma, **extra):
        calls[0] += 1
        out = den(x, sigma, **extra)
        return out.fill_(bad) if calls[0] > 6 else out

    with pytest.raises(NonFiniteError, match=rf"{name}: .*step \d+"):
        invert(name, broken, data(), karras(10), LABELS)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_model_run_with_autograd_on_gives_the_same_inversion(name):
    """A host may call the model with autograd on (a sampler called outside inference mode):
    the solvers' arithmetic must neither fail on, nor keep, the model's graph."""
    den = MixtureDenoiser(MIX, "eps")
    w = torch.ones((), requires_grad=True)
    tracked = lambda x, sigma, **kw: den(x, sigma, **kw) * w  # noqa: E731  (output requires grad)
    plain = invert(name, den, data(), karras(6), space="eps")
    inv = invert(name, tracked, data(), karras(6), space="eps")
    assert not inv.latent.requires_grad and torch.equal(inv.latent, plain.latent)


# --- the inversion record -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bdia", "aidi_anderson", "renoise"])
def test_the_record_reads_back_what_it_wrote_and_refuses_a_wrong_field(name):
    inv = invert(name, MixtureDenoiser(MIX, "eps"), data(), karras(6), LABELS, space="eps",
                 keep_trajectory=True)
    d = inv.to_dict()
    assert d["format"] == FORMAT and d["samples"] is inv.latent and d["steps"] == 6
    back = check_record(Inversion.from_dict(d))
    for f in dataclasses.fields(Inversion):
        a, b = getattr(inv, f.name), getattr(back, f.name)
        assert a is b or a == b or f.name == "base_steps" and b == inv.steps, f.name
    assert torch.equal(reconstruct(MixtureDenoiser(MIX, "eps"), back, LABELS),
                       reconstruct(MixtureDenoiser(MIX, "eps"), inv, LABELS))
    for key, value, words in (("sigmas", inv.sigmas.flip(0), "'sigmas' must be finite, ascending"),
                              ("settings", {}, "'settings' must be exactly"), ("nfe", -1, "'nfe'"),
                              ("trajectory", inv.trajectory[:2], "'trajectory' must be None or a list of 7"),
                              ("steps", MAX_STEPS + 1, "'steps' must be an integer from 1 to 1000")):
        with pytest.raises(SolverError, match=words):
            check_record(Inversion.from_dict(dict(d, **{key: value})))
    with pytest.raises(SolverError, match="lacks nfe"):
        Inversion.from_dict({k: v for k, v in d.items() if k != "nfe"})
