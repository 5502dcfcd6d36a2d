"""The one place a method is named: its inversion, the sampler that resumes it, its settings.

The Invert node builds its selector and widgets from ``METHODS``; the benchmark and the
tests iterate over it. A new method is one file in ``methods/`` and one entry here.
Solver functions take every setting as a required keyword; ``invert`` passes the
defaults written here and fills the result's ``method``, ``sampler`` and ``settings``,
so none of them is written a second time in a solver.

Papers: DDIM, Song et al., arXiv:2010.02502; AIDI, Pan et al., arXiv:2309.04907;
ReNoise, Garibi et al., arXiv:2403.14602; EasyInv, Zhang et al., arXiv:2408.05159;
BDIA, Zhang et al., arXiv:2307.10829; EDICT, Wallace et al., arXiv:2211.12446; RF-Solver,
Wang et al., arXiv:2411.04746; FireFlow, Deng et al., arXiv:2412.07517. Naive unsampling has
none (ComfyUI's FlipSigmas + euler).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .core import SolverError
from .record import Inversion, bad, real
from .methods.aidi_anderson import invert_aidi_anderson
from .methods.aidi_empirical import invert_aidi_empirical
from .methods.bdia import invert_bdia, sample_bdia
from .methods.ddim import invert_ddim
from .methods.easyinv import invert_easyinv
from .methods.edict import invert_edict, sample_edict
from .methods.euler import sample_euler
from .methods.fireflow import invert_fireflow, sample_fireflow
from .methods.fixed_point import invert_fixed_point
from .methods.naive_unsample import invert_naive_unsample
from .methods.renoise import invert_renoise
from .methods.rf_solver import invert_rf_solver, sample_rf_solver


@dataclass(frozen=True)
class Setting:
    default: object
    tooltip: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()
    # The pack version that added its widget ("" = the first release): node widgets are ordered by
    # it, since a saved workflow holds their values by position.
    added: str = ""
    # Its widget's name where it is not the setting's: methods share a widget only where they share
    # the setting's default and range, so each method runs with its own defaults.
    widget: str = ""
    # Added to the method after records of it were written: an older record lacks it (read as the default).
    later: bool = False


ITER = {
    "iterations": Setting(16, "Model calls per step, on average, at most: the inversion may spend iterations x steps "
                             "calls in all and spends them where a step needs them to meet tol (about 2 to 3 per step "
                             "at the default tol). A step that stalls is split into smaller ones (up to 16); one still "
                             "unsolved keeps its best candidate, the DDIM step included, and is reported on the node. "
                             "A small budget buys the most accuracy it can. At least 2 (one call to move a step, one "
                             "to measure the move).", 2, 100, 1),
    "tol": Setting(3e-3, "The relative round-trip error asked for, ||reconstruction - source|| / ||source||: shared "
                         "out over the steps, each solved until its error, carried to the source, is within its "
                         "part. 3e-3 is about 50 dB on a unit-variance latent, far below what a VAE or 8-bit output "
                         "shows; 1e-5 gives the tight 90 dB and more, at about twice the model calls.",
                   1e-8, 1e-1, 1e-6),
    "guess": Setting("extrapolate", "Where each step's iteration starts: 'ddim' (the DDIM inversion step, as in "
                                    "the paper) or 'extrapolate' (the previous steps' slopes, no model call, "
                                    "usually closer; at 2 or 3 calls a step far better).", choices=("ddim", "extrapolate")),
    "loop": Setting("budget", "'budget': the pack's loop (a budget of iterations x steps calls spent where the "
                              "residual needs them, stalled steps split, an unsolved one keeps its best candidate). "
                              "'paper': the loop the AIDI paper publishes, to reproduce its figures: exactly "
                              "iterations calls a step, returning F of the last iterate; no tol, no splitting, no "
                              "fallback, no carried pairs (with guess 'ddim' and carry 0 it is the paper's method).",
                    choices=("budget", "paper"), added="0.3.0", later=True),
}


@dataclass(frozen=True)
class Method:
    invert: Callable[..., Inversion]
    sampler: str
    summary: str
    settings: dict = field(default_factory=dict)

    def defaults(self) -> dict:
        return {k: s.default for k, s in self.settings.items()}

    @property
    def resumer(self) -> "Sampler":
        return SAMPLERS[self.sampler]


METHODS = {
    "ddim": Method(invert_ddim, "euler", "DDIM inversion: 1 model call per step, drifts at few steps or high cfg."),
    "naive_unsample": Method(invert_naive_unsample, "euler",
                             "Explicit Euler uphill, as FlipSigmas + euler: the baseline other packs use."),
    "fixed_point": Method(invert_fixed_point, "euler",
                          "Fixed-point iteration of the exact inverse step: accurate where it converges.", dict(ITER)),
    "aidi_anderson": Method(invert_aidi_anderson, "euler",
                            "AIDI-A: fixed-point with Anderson acceleration; round-trips to the error asked for (tol), fast.",
                            dict(ITER, m=Setting(3, "Anderson memory: how many past iterates are mixed. 2 to 5 is typical.", 1, 10, 1),
                                 beta=Setting(1.0, "Anderson damping: 1 mixes outputs only; lower it if steps oscillate.", 0.05, 1.0, 0.05),
                                 lam=Setting(1e-6, "Relative regularisation of the Anderson least-squares solve; raise it if steps fall back to plain iteration often.", 0.0, 1e-2, 1e-7),
                                 carry=Setting(0, "Secant pairs carried from step to step, so a step's first update already uses them. "
                                                  "Each costs two latents of memory; on sharply multimodal data 2 saves about 5% of "
                                                  "the model calls, on the bundled model none. 0 with guess 'ddim' is the paper's method.", 0, 32, 1))),
    "aidi_empirical": Method(invert_aidi_empirical, "euler",
                             "AIDI-E: fixed-point averaging the last two outputs; damps oscillation at no extra cost.",
                             dict(ITER)),
    "renoise": Method(invert_renoise, "euler",
                      "ReNoise: a fixed number of model calls per step, their noise estimates averaged over a window.",
                      {"iterations": Setting(5, "Model calls per step: the paper's renoising steps K plus one (its SD "
                                                "example K = 1 is 2, SDXL-Turbo K = 9 is 10; 1 = DDIM inversion).", 1, 100, 1,
                                             added="0.3.0", widget="renoise_iterations"),
                       "window": Setting((3, 5), "Calls (0-based, [from, to)) whose noise estimates are averaged "
                                                 "(paper: 8 to 10 with 10 calls); to at most iterations, from = to "
                                                 "averages none."),
                       "first_window": Setting((3, 5), "The averaging window of the low-noise steps (paper: 0 to 5, "
                                                       "which measured 5 to 21 dB worse here: it averages in the "
                                                       "first, least converged calls); to at most their calls."),
                       "first_iterations": Setting(6, "Most model calls in a low-noise step (paper: 5 renoising "
                                                      "steps, so 6).", 1, 100, 1, added="0.2.0"),
                       "first_until": Setting(0.25, "Low-noise steps: those ending below this fraction of the model's "
                                                    "training timesteps (paper: t < 250 of 1000).", 0.0, 1.0, 0.01, added="0.2.0"),
                       "reg_steps": Setting(0, "Noise regularisation rounds, for editability (paper: 4; 0 = off). "
                                               "They pull the inversion off the exact round trip.", 0, 20, 1, added="0.2.0"),
                       "lambda_ac": Setting(20.0, "Weight of the auto-correlation term of the noise regularisation "
                                                  "(paper: 20).", 0.0, 1000.0, 0.5, added="0.2.0"),
                       "lambda_kl": Setting(0.065, "Weight of the KL term of the noise regularisation (paper: 0.065).",
                                            0.0, 10.0, 0.005, added="0.2.0"),
                       "reg_seed": Setting(0, "Seed of the regularisation's reference noise and random shifts.",
                                           0, 2 ** 31 - 1, 1, added="0.2.0")}),
    "easyinv": Method(invert_easyinv, "euler",
                      "EasyInv: DDIM inversion blending the state with its past inside a window; no extra calls.",
                      {"eta": Setting(0.5, "Weight of the current state in the blend (1 = DDIM). SD1.x 0.5, SDXL 0.5 to 0.8.", 0.01, 1.0, 0.01),
                       "start": Setting(0.05, "Start of the blending window, as a fraction of the steps (SD1.x 0.05, SDXL 0.85).", 0.0, 1.0, 0.01),
                       "end": Setting(0.25, "End of the blending window, as a fraction of the steps (SD1.x 0.25, SDXL 0.95).", 0.0, 1.0, 0.01)}),
    "bdia": Method(invert_bdia, "bdia", "BDIA: exact inversion at 1 model call per step; resumes from a pair of states.",
                   {"gamma": Setting(0.94, "BDIA's gamma (paper: 0.94, range 0.92 to 1.0 for edits). Both ends round-trip to "
                                           "float rounding; on the bundled model 0.94 was the more exact.", 0.5, 1.0, 0.01)}),
    "edict": Method(invert_edict, "edict", "EDICT: exact inversion with two coupled states, 2 model calls per step.",
                    {"p": Setting(0.93, "EDICT's mixing weight (paper: 0.93); closer to 1 amplifies rounding less.", 0.5, 1.0, 0.01),
                     "order": Setting("leapfrog", "Which chain updates first: 'leapfrog' alternates every step (the "
                                                  "paper's default), 'fixed' always starts with the first chain.",
                                      choices=("leapfrog", "fixed"), added="0.2.0")}),
    "rf_solver": Method(invert_rf_solver, "rf_solver",
                        "RF-Solver: second-order Taylor steps of the flow ODE, 2 model calls per step, the same "
                        "rule to sample back; second order, not exact."),
    "fireflow": Method(invert_fireflow, "fireflow",
                       "FireFlow: midpoint steps reusing the last midpoint's slope, about 1 model call per step, "
                       "the same rule to sample back; second order, not exact."),
}

# The inversion method used where none is chosen (the Invert node's selector, the benchmark's
# pack row): accurate to the tol asked for at a few calls a step, and resumed by plain euler.
DEFAULT = "aidi_anderson"


@dataclass(frozen=True)
class Sampler:
    """How an inversion is sampled back: the function, the inversion settings it reads, the
    states it resumes from (2: ``Inversion.latent`` and ``Inversion.pair``), the fewest steps
    that leave that pair meaningful (BDIA's pair is the state one step before the end), and its
    model calls: ``per_step`` a step, ``extra`` once (BDIA's first step reuses its pair: -1)."""
    sample: Callable
    settings: tuple = ()
    states: int = 1
    min_steps: int = 1
    per_step: int = 1
    extra: int = 0

    def calls(self, steps: int) -> int:
        return self.per_step * steps + self.extra


SAMPLERS = {"euler": Sampler(sample_euler),
            "bdia": Sampler(sample_bdia, ("gamma",), states=2, min_steps=2, extra=-1),
            "edict": Sampler(sample_edict, ("p", "order"), states=2, per_step=2),
            "rf_solver": Sampler(sample_rf_solver, per_step=2),
            "fireflow": Sampler(sample_fireflow, extra=1)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise SolverError(f"unknown inversion method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def plain(default, value):
    """A setting as the record keeps it: the default's type, (lo, hi) pairs as lists of ints."""
    if isinstance(default, tuple):
        return [int(v) for v in value]
    if isinstance(default, bool) or isinstance(default, str):
        return value
    return type(default)(value)


def number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def whole(v) -> bool:
    """An integer, or a float with no fraction (a widget or a JSON file may give 3.0): never truncated."""
    return number(v) and float(v).is_integer()


def check_value(name: str, key: str, spec: Setting, v) -> None:
    """A setting's value against its ``Setting``: its choices, its (lo, hi) pair of integers >= 0,
    or its range, an integer where the default is one."""
    d = spec.default
    if isinstance(d, tuple):
        ok = isinstance(v, (list, tuple)) and len(v) == len(d) and all(whole(i) and i >= 0 for i in v)
        want = f"{len(d)} integers >= 0"
    elif spec.choices:
        ok, want = isinstance(v, str) and v in spec.choices, f"one of {', '.join(spec.choices)}"
    else:
        integer = isinstance(d, int)
        ok = (whole(v) if integer else number(v)) and (spec.lo is None or spec.lo <= v <= spec.hi)
        want = ("an integer" if integer else "a number") + ("" if spec.lo is None else f" from {spec.lo} to {spec.hi}")
    if not ok:
        raise SolverError(f"{name}: {key} must be {want}, got {v!r}")


def resolve(name: str, settings: dict) -> dict:
    """Method ``name``'s settings: its defaults overridden by ``settings``, each checked against the
    registry's ``Setting`` (unknown ones, values out of range, fractions where an integer is
    expected are refused, so before any model call)."""
    m = method(name)
    unknown = set(settings) - set(m.settings)
    if unknown:
        raise SolverError(f"{name}: unknown setting(s) {sorted(unknown)}; it takes {sorted(m.settings) or 'none'}")
    for k, v in settings.items():
        check_value(name, k, m.settings[k], v)
    return {k: plain(s.default, settings.get(k, s.default)) for k, s in m.settings.items()}


def invert(name: str, model, x, sigmas, extra_args=None, callback=None, space="eps", keep_trajectory=False,
           **settings) -> Inversion:
    """Run method ``name`` with its defaults overridden by ``settings``; the result names the method,
    its resuming sampler and every setting it ran with (the registry's facts: solvers write none of them).
    ``loop="paper"`` takes no tolerance: its record holds no ``tol`` rather than one that had no effect."""
    m = method(name)
    values = resolve(name, settings)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    inv = m.invert(model, x, sigmas, extra_args, callback, space=space, keep_trajectory=keep_trajectory, **args)
    if values.get("loop") == "paper":
        del values["tol"]
    return replace(inv, method=name, sampler=m.sampler, settings=values)


def sampler_for(sampler: str, settings: dict):
    """The sampler function named ``sampler`` and the inversion settings it takes."""
    if sampler not in SAMPLERS:
        raise SolverError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    missing = [k for k in spec.settings if k not in settings]
    if missing:
        raise SolverError(f"sampler {sampler!r} needs the setting(s) {missing}, which the inversion record lacks "
                          "(an inversion from an older version: invert again)")
    return spec.sample, {k: settings[k] for k in spec.settings}


def reconstruct(model, inv: Inversion, extra_args=None, callback=None):
    """Sample back down the inversion's own schedule with the matching sampler."""
    fn, kwargs = sampler_for(inv.sampler, inv.settings)
    return fn(model, inv.latent, inv.sigmas.flip(0), extra_args, callback, space=inv.space, pair=inv.pair, **kwargs)


def check_record(inv: Inversion) -> Inversion:
    """An inversion record against the registry: a known method, its own sampler, exactly its
    settings with values that sampler can use, and the states that sampler resumes from.
    Raises ``SolverError`` naming the field; ``Inversion.check_fields`` covers the rest."""
    m = METHODS.get(inv.method) if isinstance(inv.method, str) else None
    if m is None:
        bad("method", f"one of {', '.join(METHODS)}", repr(inv.method)[:100])
    if inv.sampler != m.sampler:
        bad("sampler", f"{m.sampler!r} (the sampler of {inv.method})", repr(inv.sampler)[:100])
    check_settings(inv.method, inv.settings)
    spec = m.resumer
    if inv.steps < spec.min_steps:
        raise SolverError(f"is a {inv.method.upper()} inversion of {inv.steps} step(s): its pair is the clean "
                          f"source, so resuming it would return the source unchanged. Invert with at least "
                          f"{spec.min_steps} steps")
    if (inv.pair is None) == (spec.states == 2):
        bad("pair", f"a tensor: {inv.method} resumes from a pair of states" if spec.states == 2
            else f"None for {inv.method}", "None" if spec.states == 2 else type(inv.pair).__name__)
    return inv


def check_settings(name: str, settings) -> None:
    """A record's settings: exactly method ``name``'s (one added later may be missing from an older
    record, ``tol`` from a paper-loop one), each of its type; those its sampler reads within the
    setting's range (the others are kept for the report)."""
    m = METHODS[name]
    required = {k for k, s in m.settings.items() if not s.later}
    if isinstance(settings, dict) and settings.get("loop") == "paper":
        required.discard("tol")  # the paper loop takes none (a record written before this holds the one given)
    if not isinstance(settings, dict) or not required <= set(settings) <= set(m.settings):
        got = ", ".join(map(repr, settings))[:200] if isinstance(settings, dict) else type(settings).__name__
        bad("settings", f"exactly {name}'s settings ({', '.join(m.settings) or 'none'})", got or "none")
    used = m.resumer.settings
    for key, spec in m.settings.items():
        if key not in settings:
            continue
        v, d = settings[key], spec.default
        if isinstance(d, tuple):
            ok = isinstance(v, (list, tuple)) and len(v) == len(d) and all(type(i) is int and i >= 0 for i in v)
            want = f"{len(d)} integers >= 0"
        elif spec.choices:
            ok, want = isinstance(v, str) and v in spec.choices, f"one of {', '.join(spec.choices)}"
        elif key in used:
            ok = real(v) and spec.lo <= v <= spec.hi
            want = f"a number from {spec.lo} to {spec.hi}"
        else:
            integer = isinstance(d, int)
            ok = ((type(v) is int) if integer else real(v)) and v >= 0
            want = f"{'an integer' if integer else 'a number'} >= 0"
        if not ok:
            bad(f"settings.{key}", want, repr(v)[:100])
