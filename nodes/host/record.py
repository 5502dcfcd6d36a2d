"""An inverted LATENT: the solvers' inversion record plus what only the host knew when Invert ran.

A LATENT carries it as one plain dict under ``latent["inversion"]`` (``Record.into``): the
solvers' ``Inversion.to_dict`` (tensors in VAE scale, as the LATENT holds them) and the host's
fields below, so the host can copy and cache it and SaveInversion writes it as it is. Nodes
never read that dict: they call ``Record.read`` (or ``resume``), which checks every field,
and, given a model, the model too, before any model evaluation::

    samples, rec = resume(node, latent, model)   # rec.inv is the solvers' Inversion
    down = rec.inv.sigmas.flip(0)                 # the sampling schedule
    cfg = rec.cfg_for(node, "cfg", cfg)           # -1 is the inversion's own cfg

The format (its number, the solvers' fields) is ``solvers.record``'s. A host field added later
gets a default here, so older records still read.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, replace
from typing import Optional
import torch

from ...solvers import Inversion, SolverError, check_record
from ...solvers.record import NotARecord, check_tensor, real
from .inputs import CFG_MAX, fail
from .model import check_latent, describe, sigma_max, space_of
from .run import to_model

KEY = "inversion"  # the LATENT key of the record: the inversion, as a dict
PLAIN = ("it did not come from Invert, or a node on the way rebuilt the LATENT dict and dropped the record. "
         "Connect Invert's output directly; for a plain latent use KSampler")


@dataclass(frozen=True)
class Record:
    """One inversion as Invert made it. ``inv``: the solvers' record, its tensors in VAE scale.

    source       the image latent that was inverted (``inv.trajectory[0]`` when kept)
    cfg          guidance used while inverting
    scheduler    the host scheduler that made ``inv.sigmas``
    denoise      the Invert node's denoise
    model        ``describe`` of the model: ``{"prediction": ..., "latent_format": ...}``
    summary      the text Invert showed: steps, model calls, convergence and what it costs
                 (added to format 1 with the convergence control: absent from older records)
    roundtrip    the round trip Invert measured: the relative error of sampling back down the
                 schedule at the inversion's cfg, the worst item, in the LATENT's scale; None
                 where it did not measure (added to format 1 in 0.3.0)
    """

    inv: Inversion
    source: torch.Tensor
    cfg: float
    scheduler: str
    denoise: float
    model: dict
    summary: str = ""
    roundtrip: Optional[float] = None

    @classmethod
    def host_fields(cls):
        return [f for f in fields(cls) if f.name != "inv"]

    # --- to and from a LATENT -----------------------------------------------------------------

    def as_dict(self) -> dict:
        """The record as a LATENT carries it (tensors by reference, not copied)."""
        return {**self.inv.to_dict(), **{f.name: getattr(self, f.name) for f in self.host_fields()}}

    def into(self, latent: dict) -> dict:
        """A new LATENT: ``latent``'s other keys, these samples and this record."""
        out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask", KEY)}
        out["samples"] = self.inv.latent
        out[KEY] = self.as_dict()
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
        d = latent.get(KEY)
        if not isinstance(d, dict):
            fail(node, what, f"carries no inversion record: {hint}")
        # The LATENT's samples against the record's first: a node that changed them breaks everything else.
        if isinstance(d.get("samples"), torch.Tensor):
            same_samples(node, what, tuple(latent["samples"].shape), tuple(d["samples"].shape))
        own = [f.name for f in cls.host_fields() if f.default is MISSING and f.default_factory is MISSING]
        try:
            inv = check_record(Inversion.from_dict(d, own))
        except NotARecord as e:
            fail(node, what, f"{e}: {hint}")
        except SolverError as e:
            fail(node, what, str(e))
        rec = cls(inv, **{f.name: d[f.name] for f in cls.host_fields() if f.name in d})
        rec.check_host_fields(node, what, latent["samples"])
        if model is not None:
            rec.check_model(node, what, model)
        return rec

    # --- checks ---------------------------------------------------------------------------------

    def check_host_fields(self, node: str, what: str, samples: torch.Tensor):
        """The host's fields, and the LATENT's ``samples`` against the record's."""
        def bad(field, expected, got=None):
            shown = "" if got is None else f", got {got}"
            fail(node, what, f"its inversion record is malformed: '{field}' must be {expected}{shown}")

        if not isinstance(self.scheduler, str) or not 0 < len(self.scheduler) <= 100:
            bad("scheduler", "a scheduler name", repr(self.scheduler)[:100])
        if not (isinstance(self.model, dict) and set(self.model) == {"prediction", "latent_format"}
                and all(isinstance(v, str) for v in self.model.values())):
            bad("model", "{'prediction': str, 'latent_format': str}", repr(self.model)[:200])
        if not real(self.cfg) or not 0 <= self.cfg <= CFG_MAX:
            bad("cfg", f"a number from 0 to {CFG_MAX:g}", repr(self.cfg)[:100])
        if not real(self.denoise) or not 0 < self.denoise <= 1:
            bad("denoise", "a number in (0, 1]", repr(self.denoise)[:100])
        if not (isinstance(self.summary, str) and len(self.summary) <= 4096):
            bad("summary", "a text of at most 4096 characters", type(self.summary).__name__)
        if not (self.roundtrip is None or real(self.roundtrip) and self.roundtrip >= 0):
            bad("roundtrip", "None or a number >= 0", repr(self.roundtrip)[:100])
        try:
            check_tensor("source", self.source, tuple(samples.shape))
        except SolverError as e:
            fail(node, what, str(e))
        if self.inv.pair is not None and samples is not self.inv.latent and not torch.equal(samples, self.inv.latent):
            fail(node, what, f"its samples were changed after Invert, so the {self.inv.method} pair no longer "
                             "matches them; reconnect Invert's output directly")

    def check_model(self, node: str, what: str, model):
        """The model that resumes the inversion must be the kind that made it."""
        have = describe(model)
        if have != self.model:
            fail(node, "model", f"the inversion was made with a {self.model['prediction']} model "
                                f"({self.model['latent_format']} latents) but this model is {have['prediction']} "
                                f"({have['latent_format']}): resume it with the model that inverted it")
        space = space_of(model, node)
        if space != self.inv.space:
            fail(node, what, f"its inversion record says space {self.inv.space!r} but this model samples in "
                             f"{space!r} space: the record is inconsistent")
        top, end = sigma_max(model), float(self.inv.sigmas[-1])
        if end > top * (1 + 1e-4):
            fail(node, what, f"its inversion record is malformed: 'sigmas' must end at most at the model's "
                             f"sigma_max {top:g}, got {end:g}")

    # --- for the nodes that resume it ---------------------------------------------------------

    def cfg_for(self, node: str, what: str, cfg) -> float:
        """The guidance to resume with: ``cfg``, or the inversion's own for the sentinel -1."""
        if cfg == -1:
            return self.cfg
        if not real(cfg) or not 0 <= cfg <= CFG_MAX:
            fail(node, what, f"expected -1 (the inversion's cfg, {self.cfg:g}) or a value from 0 to {CFG_MAX:g}, "
                             f"got {cfg}")
        return float(cfg)

    def in_model_space(self, inner, like) -> Inversion:
        """The inversion with its latent ``like`` (the guider's, in model space) and its pair converted
        to model space: what the solvers resume from."""
        return replace(self.inv, latent=like, pair=to_model(inner, self.inv.pair, like))


def not_inverted(node: str, latent, what: str, use: str) -> None:
    """Refuses a LATENT that carries an inversion record where the image's own latent is expected:
    its samples are the noise, and whatever is made of them as if they were the image is wrong."""
    if isinstance(latent, dict) and KEY in latent:
        fail(node, what, f"expected the image's latent (VAEEncode), got an inverted one (an Invert or LoadInversion "
                         f"output: its samples are noise): {use}")


def same_samples(node: str, what: str, have: tuple, recorded: tuple) -> None:
    """The LATENT's samples (``have``) must keep the shape the inversion recorded."""
    if have != recorded:
        fail(node, what, f"its samples have shape {have} but the inversion's have {recorded}: a node changed them "
                         "after Invert; reconnect Invert's output directly")


def resume(node: str, latent, model, what: str = "inverted"):
    """An inverted LATENT's samples and its ``Record``, checked against the model that resumes it."""
    rec = Record.read(node, latent, what, model)
    return latent["samples"], rec
