"""The inversion record: what Invert leaves for Reconstruct, the editors and SaveInversion.

This file is the one place the record's fields are named. A LATENT carries the record
as a plain dict under ``latent["inversion"]`` (``Record.into``), so the host can copy and
cache it and SaveInversion writes it as it is. Nodes never read that dict: they call
``Record.read`` (or ``host.resume``), which checks every field against the format and,
given a model, against that model, before any model evaluation, and use attributes::

    samples, rec = host.resume(node, latent, model)   # rec is a Record
    fn, kwargs = sampler_for(rec.sampler, rec.settings)
    down = rec.sigmas.flip(0)                          # the sampling schedule
    cfg = rec.cfg_for(node, "cfg", cfg)                # -1 is the inversion's own cfg

Format 1 is every record Invert has written and every file SaveInversion has saved. A
field added later gets a default (so older records still read) and a check in
``Record.check``; bump ``FORMAT`` only when an existing field changes meaning.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

import torch

from ..solvers import METHODS, SAMPLERS, SPACES, FLOW, Inversion
from ..solvers.core import summary
from .host import RECORD, check_latent, describe, fail, space_of

FORMAT = 1
MAX_STEPS = 1000  # Invert's widget limit
# A refined schedule may split each of the steps into up to 2**8 sub-steps.
REFINE = 2 ** 8
PLAIN = ("it did not come from Invert, or a node on the way rebuilt the LATENT dict and dropped the record. "
         "Connect Invert's output directly; for a plain latent use KSampler")


def _real(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _check_tensor(bad, name, t, shape):
    if not isinstance(t, torch.Tensor):
        bad(name, f"a tensor of the samples' shape {shape}", type(t).__name__)
    if tuple(t.shape) != shape or not t.is_floating_point():
        bad(name, f"a floating-point tensor of the samples' shape {shape}", f"{tuple(t.shape)} {t.dtype}")
    if not torch.isfinite(t).all():
        bad(name, "finite", "NaN or inf values")


@dataclass(frozen=True)
class Record:
    """One inversion, as Invert made it. Tensors are in VAE scale, as a LATENT holds them.

    method       name in ``solvers.METHODS``
    settings     that method's settings as used (exactly its keys in the registry)
    sampler      name in ``solvers.SAMPLERS`` that resumes it (the method's own)
    space        ``"eps"`` or ``"flow"``, the model's
    sigmas       the schedule as the solver ran it, ascending strictly from 0; index i is the state
                 ``trajectory[i]``; ``steps + 1`` long, up to ``1 + steps * REFINE`` when refined
    nfe          model evaluations the inversion took
    residuals    per step, the largest final relative residual (iterative methods; else empty)
    unconverged  0-based indices of the steps that stopped at their iteration cap
    pair         BDIA's state at ``sigmas[-2]`` or EDICT's twin state; None for the others
    trajectory   the state at every sigma, or None; ``trajectory[0] is source`` and
                 ``trajectory[-1] is samples`` as Invert writes it
    source       the image latent that was inverted
    samples      the inverted noise latent (the LATENT's ``samples`` when untouched)
    cfg          guidance used while inverting
    steps        the Invert node's steps
    scheduler    the host scheduler that made ``sigmas``
    denoise      the Invert node's denoise
    model        ``host.describe`` of the model: ``{"prediction": ..., "latent_format": ...}``

    Added to format 1 by the convergence control (absent from older records: the defaults):
    budget       the model-call budget of an iterative method, or None
    split        0-based indices of the node's steps that were split into smaller ones
    kept_ddim    0-based indices (of ``sigmas``' steps) where an unsolved step kept the DDIM step
    costs        per step of ``sigmas``, its first-order share of the reconstruction error
    summary      the text Invert showed: steps, model calls, convergence and what it costs
    """

    method: str
    settings: dict
    sampler: str
    space: str
    sigmas: torch.Tensor
    nfe: int
    residuals: list
    unconverged: list
    pair: Optional[torch.Tensor]
    trajectory: Optional[list]
    source: torch.Tensor
    samples: torch.Tensor
    cfg: float
    steps: int
    scheduler: str
    denoise: float
    model: dict
    budget: Optional[int] = None
    split: list = field(default_factory=list)
    kept_ddim: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    summary: str = ""

    @classmethod
    def of(cls, inv: Inversion, *, pair, trajectory, source, samples, cfg, steps, scheduler, denoise, model):
        """From a solver's ``Inversion`` and the node's inputs (tensors already in VAE scale)."""
        return cls(method=inv.method, settings=dict(inv.settings), sampler=inv.sampler, space=inv.space,
                   sigmas=inv.sigmas.detach().cpu(), nfe=int(inv.nfe), residuals=[float(r) for r in inv.residuals],
                   unconverged=[int(i) for i in inv.unconverged], pair=pair, trajectory=trajectory, source=source,
                   samples=samples, cfg=float(cfg), steps=int(steps), scheduler=scheduler, denoise=float(denoise),
                   model=describe(model), budget=inv.budget, split=[int(i) for i in inv.split],
                   kept_ddim=[int(i) for i in inv.kept_ddim], costs=[float(c) for c in inv.costs],
                   summary=summary(inv))

    # --- to and from a LATENT -----------------------------------------------------------------

    def as_dict(self) -> dict:
        """The record as a LATENT carries it (tensors by reference, not copied)."""
        return {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def into(self, latent: dict) -> dict:
        """A new LATENT: ``latent``'s other keys, these samples and this record."""
        out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask", RECORD)}
        out["samples"] = self.samples
        out[RECORD] = self.as_dict()
        return out

    @classmethod
    def read(cls, node: str, latent, what: str, model=None, hint: str = PLAIN) -> "Record":
        """The record ``latent`` carries, every field checked; with ``model``, checked against it too.

        Raises ``NodeInputError`` naming ``node`` and ``what`` (``'model'`` for a model
        mismatch) for anything Reconstruct or the editors could not use as it is.
        """
        if model is not None:
            check_latent(node, latent, model, what)
        elif not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
            fail(node, what, "expected a LATENT (a dict with a 'samples' tensor)")
        d = latent.get(RECORD)
        if not isinstance(d, dict):
            fail(node, what, f"carries no inversion record: {hint}")
        version = d.get("format")
        if type(version) is not int or version < 1:
            fail(node, what, f"its inversion record has no valid format number (got {version!r}); {hint}")
        if version > FORMAT:
            fail(node, what, f"its inversion record has format {version}, newer than this Inversion Suite reads "
                             f"(up to {FORMAT}): update the pack")
        # A field with a default was added after format 1 began: older records read without it.
        missing = [f.name for f in fields(cls) if f.name not in d
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            fail(node, what, f"its inversion record lacks {', '.join(missing)}: {hint}")
        rec = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        rec.check(node, what, latent["samples"])
        if model is not None:
            rec.check_model(node, what, model)
        return rec

    # --- checks ---------------------------------------------------------------------------------

    def check(self, node: str, what: str, samples: torch.Tensor):
        """Every field's type, shape, length and value, without a model; ``samples``: the LATENT's."""
        def bad(field, expected, got=None):
            shown = "" if got is None else f", got {got}"
            fail(node, what, f"its inversion record is malformed: '{field}' must be {expected}{shown}")

        m = self._check_names(bad)
        self._check_settings(m, bad)
        self._check_numbers(bad)
        n = self._check_schedule(bad)
        if m.sampler == "bdia" and n < 2:
            fail(node, what, "is a BDIA inversion of 1 step: its pair is the clean source, so resuming it would "
                             "return the source unchanged. Invert with at least 2 steps")
        self._check_tensors(node, what, m, bad, samples)

    def _check_names(self, bad):
        m = METHODS.get(self.method) if isinstance(self.method, str) else None
        if m is None:
            bad("method", f"one of {', '.join(METHODS)}", repr(self.method)[:100])
        if self.sampler != m.sampler:
            bad("sampler", f"{m.sampler!r} (the sampler of {self.method})", repr(self.sampler)[:100])
        if not isinstance(self.space, str) or self.space not in SPACES:
            bad("space", f"one of {', '.join(SPACES)}", repr(self.space)[:100])
        if not isinstance(self.scheduler, str) or not 0 < len(self.scheduler) <= 100:
            bad("scheduler", "a scheduler name", repr(self.scheduler)[:100])
        if not (isinstance(self.model, dict) and set(self.model) == {"prediction", "latent_format"}
                and all(isinstance(v, str) for v in self.model.values())):
            bad("model", "{'prediction': str, 'latent_format': str}", repr(self.model)[:200])
        return m

    def _check_settings(self, m, bad):
        s = self.settings
        if not isinstance(s, dict):
            bad("settings", f"a dict of {self.method}'s settings", type(s).__name__)
        if set(s) != set(m.settings):
            bad("settings", f"exactly {self.method}'s settings ({', '.join(m.settings) or 'none'})",
                ", ".join(map(repr, s))[:200] or "none")
        used = SAMPLERS[m.sampler][1]  # the settings resuming reads; the others are kept for the report
        for key, spec in m.settings.items():
            v, d = s[key], spec.default
            if isinstance(d, tuple):
                ok = isinstance(v, (list, tuple)) and len(v) == len(d) and all(type(i) is int and i >= 0 for i in v)
                want = f"{len(d)} integers >= 0"
            elif spec.choices:
                ok, want = isinstance(v, str) and v in spec.choices, f"one of {', '.join(spec.choices)}"
            elif key in used:
                ok = _real(v) and spec.lo <= v <= spec.hi
                want = f"a number from {spec.lo} to {spec.hi}"
            else:
                integer = isinstance(d, int)
                ok = ((type(v) is int) if integer else _real(v)) and v >= 0
                want = f"{'an integer' if integer else 'a number'} >= 0"
            if not ok:
                bad(f"settings.{key}", want, repr(v)[:100])

    def _check_numbers(self, bad):
        if type(self.steps) is not int or not 1 <= self.steps <= MAX_STEPS:
            bad("steps", f"an integer from 1 to {MAX_STEPS}", repr(self.steps)[:100])
        if type(self.nfe) is not int or self.nfe < 0:
            bad("nfe", "a count (an integer >= 0)", repr(self.nfe)[:100])
        if not _real(self.cfg) or not 0 <= self.cfg <= 100:
            bad("cfg", "a number from 0 to 100", repr(self.cfg)[:100])
        if not _real(self.denoise) or not 0 < self.denoise <= 1:
            bad("denoise", "a number in (0, 1]", repr(self.denoise)[:100])

    def _check_schedule(self, bad) -> int:
        """The sigmas, residuals and unconverged steps; returns the schedule's number of steps."""
        s = self.sigmas
        if not isinstance(s, torch.Tensor) or s.ndim != 1 or not s.is_floating_point():
            bad("sigmas", "a 1-D floating-point tensor",
                f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__)
        if not self.steps + 1 <= s.numel() <= 1 + self.steps * REFINE:
            bad("sigmas", f"from steps + 1 = {self.steps + 1} to 1 + steps * {REFINE} = {1 + self.steps * REFINE} "
                          "long", f"{s.numel()} values")
        if not torch.isfinite(s).all() or s[0] != 0 or not (s[1:] > s[:-1]).all():
            bad("sigmas", "finite, ascending strictly from 0")
        if self.space == FLOW and s[-1] > 1:
            bad("sigmas", "at most 1 in flow space", f"{float(s[-1]):g}")
        n = s.numel() - 1
        r = self.residuals
        if not (isinstance(r, list) and len(r) <= n and all(_real(v) and v >= 0 for v in r)):
            bad("residuals", f"a list of at most {n} numbers >= 0",
                f"{len(r)} item(s)" if isinstance(r, list) else type(r).__name__)
        for name, top in (("unconverged", n), ("kept_ddim", n), ("split", self.steps)):
            u = getattr(self, name)
            if not (isinstance(u, list) and all(type(i) is int and 0 <= i < top for i in u)
                    and all(a < b for a, b in zip(u, u[1:]))):
                bad(name, f"a list of increasing step indices from 0 to {top - 1}",
                    repr(u)[:100] if isinstance(u, list) else type(u).__name__)
        c = self.costs
        if not (isinstance(c, list) and len(c) <= n and all(_real(v) and v >= 0 for v in c)):
            bad("costs", f"a list of at most {n} numbers >= 0",
                f"{len(c)} item(s)" if isinstance(c, list) else type(c).__name__)
        if not (self.budget is None or type(self.budget) is int and self.budget >= 0):
            bad("budget", "None or a count (an integer >= 0)", repr(self.budget)[:100])
        if not (isinstance(self.summary, str) and len(self.summary) <= 4096):
            bad("summary", "a text of at most 4096 characters", type(self.summary).__name__)
        return n

    def _check_tensors(self, node, what, m, bad, samples):
        shape = tuple(samples.shape)
        if isinstance(self.samples, torch.Tensor) and tuple(self.samples.shape) != shape:
            fail(node, what, f"its samples have shape {shape} but the inversion's have {tuple(self.samples.shape)}: "
                             "a node changed them after Invert; reconnect Invert's output directly")
        two = m.sampler in ("bdia", "edict")
        if (self.pair is None) == two:
            bad("pair", f"a tensor: {self.method} resumes from a pair of states" if two else f"None for {self.method}",
                "None" if two else type(self.pair).__name__)
        for name in ("samples", "source") + (("pair",) if two else ()):
            _check_tensor(bad, name, getattr(self, name), shape)
        t = self.trajectory
        if t is not None:
            if not isinstance(t, list) or len(t) != self.sigmas.numel():
                bad("trajectory", f"None or a list of {self.sigmas.numel()} tensors (one per sigma)",
                    f"{len(t)} item(s)" if isinstance(t, list) else type(t).__name__)
            for i, x in enumerate(t):
                _check_tensor(bad, f"trajectory[{i}]", x, shape)
        if two and samples is not self.samples and not torch.equal(samples, self.samples):
            fail(node, what, f"its samples were changed after Invert, so the {self.method} pair no longer "
                             "matches them; reconnect Invert's output directly")

    def check_model(self, node: str, what: str, model):
        """The model that resumes the inversion must be the kind that made it."""
        have = describe(model)
        if have != self.model:
            fail(node, "model", f"the inversion was made with a {self.model['prediction']} model "
                                f"({self.model['latent_format']} latents) but this model is {have['prediction']} "
                                f"({have['latent_format']}): resume it with the model that inverted it")
        space = space_of(model, node)
        if space != self.space:
            fail(node, what, f"its inversion record says space {self.space!r} but this model samples in "
                             f"{space!r} space: the record is inconsistent")
        top = float(model.get_model_object("model_sampling").sigma_max)
        if float(self.sigmas[-1]) > top * (1 + 1e-4):
            fail(node, what, f"its inversion record is malformed: 'sigmas' must end at most at the model's "
                             f"sigma_max {top:g}, got {float(self.sigmas[-1]):g}")

    # --- for the nodes that resume it ---------------------------------------------------------

    def cfg_for(self, node: str, what: str, cfg) -> float:
        """The guidance to resume with: ``cfg``, or the inversion's own for the sentinel -1."""
        if cfg == -1:
            return self.cfg
        if not _real(cfg) or cfg < 0:
            fail(node, what, f"expected -1 (the inversion's cfg, {self.cfg:g}) or a value >= 0, got {cfg}")
        return float(cfg)
