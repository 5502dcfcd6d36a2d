"""The inversion record: what an inversion leaves, as a solver returns it and as a LATENT or an
inversion file carries it.

``Inversion`` is the one declaration of its fields. ``to_dict`` gives the plain form (tensors
by reference) under the record's format number; ``from_dict`` reads one back and checks
every field's type, length and value, so that nothing read from a file reaches a model
unchecked. What the registry knows (the method's name, its settings, its sampler and the
states that sampler resumes from) is checked by ``registry.check_record``. Format 1 is every
record this pack has written: a field added later gets a default, so older records still
read; bump ``FORMAT`` only when an existing field changes meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from .core import DEPTH, FLOW, SPACES, SolverError

FORMAT = 1
# The most steps a record holds: Invert's widget stops there, so no record the pack writes has more.
MAX_STEPS = 1000
# A refined schedule splits each of its steps into at most this many (the implicit loop's split depth).
REFINE = 2 ** DEPTH
# Field -> key of the plain form, where the key kept the name that format 1 gave it.
KEYS = {"latent": "samples", "base_steps": "steps"}
# Fields added to format 1 after its first files were written: older records lack them (the defaults).
LATER = ("budget", "split", "kept_ddim", "costs")


@dataclass
class Inversion:
    """What an inversion leaves: enough to reconstruct, edit or judge it.

    ``latent`` is the state at ``sigmas[-1]``; ``pair`` the second state that exact
    two-state methods resume from (BDIA: the state at ``sigmas[-2]``; EDICT: its twin
    chain). ``trajectory`` holds x at every sigma (index i at ``sigmas[i]``) when kept.
    ``residuals`` gives, per step, the largest final relative residual over the batch
    for iterative methods, and ``unconverged`` the steps that did not reach their
    tolerance. The fixed-point methods also fill the fields after ``unconverged``: the
    call ``budget``, the ``base_steps`` of the schedule they were given (None: the schedule
    was not split, ``steps``), the base steps they ``split`` (their ``sigmas`` hold the
    inserted sigmas), the steps where some item ``kept_ddim`` (the DDIM step reproduced
    the step's start better than any iterate) and, per step, ``costs``: the relative forward
    error of the state the step kept (estimated where it kept F of its best iterate), its
    first-order share of the round trip (largest over the batch).
    """

    latent: torch.Tensor = field(repr=False)
    sigmas: torch.Tensor = field(repr=False)
    # method, settings and sampler are the registry's facts: ``registry.invert`` fills them,
    # so a solver need not write them (keyword-only, so they may default here).
    method: Optional[str] = field(default=None, kw_only=True)
    space: str
    settings: Optional[dict] = field(default=None, kw_only=True)
    nfe: int
    sampler: Optional[str] = field(default=None, kw_only=True)
    pair: Optional[torch.Tensor] = field(default=None, repr=False)
    trajectory: Optional[list] = field(default=None, repr=False)
    residuals: list = field(default_factory=list)
    unconverged: list = field(default_factory=list)
    budget: Optional[int] = None
    base_steps: Optional[int] = None
    split: list = field(default_factory=list)
    kept_ddim: list = field(default_factory=list)
    costs: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    # --- the plain form -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The record as a LATENT and a file carry it: plain values, tensors by reference."""
        d = {"format": FORMAT, **{KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}}
        d["steps"] = self.base_steps or self.steps  # an unsplit schedule's steps are its own
        return d

    @staticmethod
    def required() -> list:
        """The keys every record has held since format 1 began."""
        return [KEYS.get(f.name, f.name) for f in fields(Inversion) if f.name not in LATER]

    @classmethod
    def from_dict(cls, d: dict, required=()) -> "Inversion":
        """An inversion from its plain form, every field checked (``SolverError`` says which and why).

        ``required``: the caller's own keys that must be there too; other keys are left to the
        caller (a LATENT's record also holds the host's facts)."""
        version = d.get("format")
        if type(version) is not int or version < 1:
            raise NotARecord(f"its inversion record has no valid format number (got {version!r})")
        if version > FORMAT:
            raise SolverError(f"its inversion record has format {version}, newer than this Inversion Suite reads "
                              f"(up to {FORMAT}): update the pack")
        missing = [k for k in [*cls.required(), *required] if k not in d]
        if missing:
            raise NotARecord(f"its inversion record lacks {', '.join(missing)}")
        inv = cls(**{f.name: d[KEYS.get(f.name, f.name)] for f in fields(cls) if KEYS.get(f.name, f.name) in d})
        inv.check_fields()
        return inv

    # --- checks ---------------------------------------------------------------------------------

    def check_fields(self) -> None:
        """Every field's type, length and value but the registry's facts (method, settings, sampler, pair:
        ``registry.check_record``)."""
        if not isinstance(self.space, str) or self.space not in SPACES:
            bad("space", f"one of {', '.join(SPACES)}", repr(self.space)[:100])
        if type(self.nfe) is not int or self.nfe < 0:
            bad("nfe", "a count (an integer >= 0)", repr(self.nfe)[:100])
        if type(self.base_steps) is not int or not 1 <= self.base_steps <= MAX_STEPS:
            bad("steps", f"an integer from 1 to {MAX_STEPS}", repr(self.base_steps)[:100])
        n = self._check_schedule()
        self._check_steps(n)
        self._check_tensors()

    def _check_schedule(self) -> int:
        s, steps = self.sigmas, self.base_steps
        if not isinstance(s, torch.Tensor) or s.ndim != 1 or not s.is_floating_point():
            bad("sigmas", "a 1-D floating-point tensor",
                f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__)
        if not steps + 1 <= s.numel() <= 1 + steps * REFINE:
            bad("sigmas", f"from steps + 1 = {steps + 1} to 1 + steps * {REFINE} = {1 + steps * REFINE} long",
                f"{s.numel()} values")
        if not torch.isfinite(s).all() or s[0] != 0 or not (s[1:] > s[:-1]).all():
            bad("sigmas", "finite, ascending strictly from 0")
        if self.space == FLOW and s[-1] > 1:
            bad("sigmas", "at most 1 in flow space", f"{float(s[-1]):g}")
        return s.numel() - 1

    def _check_steps(self, n: int) -> None:
        """The per-step lists and the budget; ``n``: the schedule's steps."""
        for name in ("residuals", "costs"):
            r = getattr(self, name)
            if not (isinstance(r, list) and len(r) <= n and all(real(v) and v >= 0 for v in r)):
                bad(name, f"a list of at most {n} numbers >= 0",
                    f"{len(r)} item(s)" if isinstance(r, list) else type(r).__name__)
        for name, top in (("unconverged", n), ("kept_ddim", n), ("split", self.base_steps)):
            u = getattr(self, name)
            if not (isinstance(u, list) and all(type(i) is int and 0 <= i < top for i in u)
                    and all(a < b for a, b in zip(u, u[1:]))):
                bad(name, f"a list of increasing step indices from 0 to {top - 1}",
                    repr(u)[:100] if isinstance(u, list) else type(u).__name__)
        if not (self.budget is None or type(self.budget) is int and self.budget >= 0):
            bad("budget", "None or a count (an integer >= 0)", repr(self.budget)[:100])

    def _check_tensors(self) -> None:
        x = self.latent
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5) or not x.is_floating_point() or x.numel() == 0:
            bad("samples", "a 4D or 5D floating-point tensor",
                f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
        if not torch.isfinite(x).all():
            bad("samples", "finite", "NaN or inf values")
        if self.pair is not None:
            check_tensor("pair", self.pair, tuple(x.shape))
        t = self.trajectory
        if t is not None:
            if not isinstance(t, list) or len(t) != self.sigmas.numel():
                bad("trajectory", f"None or a list of {self.sigmas.numel()} tensors (one per sigma)",
                    f"{len(t)} item(s)" if isinstance(t, list) else type(t).__name__)
            for i, v in enumerate(t):
                check_tensor(f"trajectory[{i}]", v, tuple(x.shape))


class NotARecord(SolverError):
    """A dict that is no inversion record this pack wrote: no format number, or fields missing."""


def bad(name: str, expected: str, got=None):
    shown = "" if got is None else f", got {got}"
    raise SolverError(f"its inversion record is malformed: '{name}' must be {expected}{shown}")


def real(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_tensor(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        bad(name, f"a tensor of the samples' shape {shape}", type(t).__name__)
    if tuple(t.shape) != shape or not t.is_floating_point():
        bad(name, f"a floating-point tensor of the samples' shape {shape}", f"{tuple(t.shape)} {t.dtype}")
    if not torch.isfinite(t).all():
        bad(name, "finite", "NaN or inf values")


def spans(idx) -> str:
    """0-based step indices as 1-based ranges, as progress counts steps: [0, 1, 2, 6] -> '1-3, 7'."""
    out, idx = [], sorted(i + 1 for i in idx)
    for i in idx:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def summary(inv: Inversion, measured=None, calls=None) -> str:
    """What the user should know about an inversion, in a few sentences.

    ``measured``: the round trip's relative error, sampled back and measured (the worst item),
    with ``calls`` the model calls that took; where given, it is the figure shown, and no step is
    called converged while it misses the tolerance. Without it, a step's cost to the reconstruction is estimated to first order by
    its ``costs`` entry (sampling back lands off by ``x - F(x)`` there, relative to ``x``, taken to
    reach the source at that relative size, as it does for Gaussian data); the estimate adds them up.
    """
    n, base = inv.steps, inv.base_steps or inv.steps
    steps = f"{base} steps" + (f" ({n} after splitting step(s) {spans(inv.split)})" if n != base else "")
    head = f"{inv.method}: {steps}, {inv.nfe} model calls" + (f" (budget {inv.budget})" if inv.budget else "")
    more = "" if calls is None else f", {calls} more model calls"
    shown = "" if measured is None else f" Round trip measured: {measured:.1e} relative (the worst item{more})."
    if not inv.residuals:
        return head + ("; no residual is measured: its error is its method's." if measured is None else "." + shown)
    res, tol, bad = inv.residuals, inv.settings.get("tol", 0), inv.unconverged
    total = sum(inv.costs)
    estimate = f" Estimated reconstruction error, to first order: {total:.1e} relative"
    if not bad and measured is not None and measured > tol:
        return (f"{head}; every step's residual reached tol {tol:g} (largest {max(res):.1e}), but the round trip "
                f"misses it.{shown} Raise iterations, lower tol or use more steps.")
    if not bad:
        return (f"{head}; every step converged (largest residual {max(res):.1e}; tol {tol:g}, the round-trip "
                f"error asked for, shared over the steps)." + (shown or estimate + "."))
    s = [float(v) for v in inv.sigmas]
    w = max(bad, key=res.__getitem__)
    text = (f"{head}. {len(bad)} of {n} steps did NOT converge to tol {tol:g}: step(s) {spans(bad)}; the worst, "
            f"step {w + 1} (sigma {s[w]:.4g} to {s[w + 1]:.4g}), has residual {res[w]:.1e}.")
    if inv.kept_ddim:
        text += (f" {len(inv.kept_ddim)} of them (step(s) {spans(inv.kept_ddim)}) kept the DDIM step, which "
                 "reproduced their start better than any iterate.")
    lost = sum(inv.costs[i] for i in bad)
    return (text + (shown or f"{estimate}, {lost:.1e} of it from the unconverged steps (it can be far larger where "
                              "the image lies between two modes of the model).")
            + " Raise iterations, loosen tol or use more steps.")
