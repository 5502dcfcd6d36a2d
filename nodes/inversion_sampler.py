"""InversionSampler: the single-state methods as a SAMPLER for SamplerCustomAdvanced graphs."""

import logging
from collections import deque

import comfy.samplers
import torch
from comfy_api.latest import io

from ..solvers import DEFAULT, FLOW, METHODS, invert, sampler_for
from ..solvers.core import FLIPPED_ZERO
from ..solvers.record import summary
from .host import widgets
from .host.inputs import fail
from .host.model import space_of
from .host.run import named, tell

NODE = "InversionSampler"
SINGLE = [name for name, m in METHODS.items() if m.resumer.states == 1]


def _with_denoised(callback):
    """The host's KSAMPLER callback reads ``denoised`` on the first step (ComfyUI 0.33): never hand it None."""
    if callback is None:
        return None

    def call(d):
        callback(d if d.get("denoised") is not None else {**d, "denoised": d["x"]})
    return call


def _at_base(base, callback):
    """Calls back at the sigmas of the host's schedule only, numbered as the host counts its steps."""
    if callback is None:
        return None
    at = {float(v): i for i, v in enumerate(base[1:])}
    return lambda d: callback(dict(d, i=at[float(d["sigma"])])) if float(d["sigma"]) in at else None


class SplitSchedule:
    """The schedules the sampler's recent inversions ran, steps split where they stalled, each kept
    under the host's schedule it was given and a fingerprint of the noise it returned: sampling
    that noise back down the given schedule follows the split one, as Reconstruct follows an
    Invert record, so that the round trip stays exact. The host caches and reuses a SAMPLER, so
    one sampler may invert several latents on one schedule; each finds its own by its noise."""

    KEEP = 8  # inversions remembered; an older one samples back down the host's schedule as given
    PROBE = 1024  # values of the noise compared (evenly strided)
    MATCH = 1e-4  # relative distance within which a latent is the noise an inversion returned

    def __init__(self):
        self.runs = deque(maxlen=self.KEEP)

    @classmethod
    def fingerprint(cls, x):
        flat = x.detach().flatten()
        return tuple(x.shape), flat[:: max(1, flat.numel() // cls.PROBE)][: cls.PROBE].to("cpu", torch.float64)

    def remember(self, given_up, ran_up, noise):
        """After an inversion: the ascending schedule given, the one run and the noise it returned."""
        if ran_up.numel() != given_up.numel():
            self.runs.appendleft((tuple(float(v) for v in given_up.flip(0)), ran_up.flip(0), self.fingerprint(noise)))

    def down(self, sigmas, x):
        """The schedule to sample ``x`` down for the host's descending ``sigmas``, or None to use them as they are."""
        given = tuple(float(v) for v in sigmas)
        shape, probe = self.fingerprint(x)
        for schedule, ran, (s, p) in self.runs:
            # The host hands a flow state back as (1 - s) * (x_N / (1 - s)): equal up to rounding, not bit for bit.
            if schedule == given and s == shape and float((probe - p).norm()) <= self.MATCH * float(p.norm()):
                return ran.to(sigmas)
        return None


def _function(method, kwargs):
    split = SplitSchedule()

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        space = space_of(model.inner_model.model_patcher, NODE)  # model: the host's KSampler wrapper of the guider
        callback = _with_denoised(callback)
        if sigmas[0] < sigmas[-1]:
            # KSAMPLER hands flow models (1 - s0) * latent (+ s0 * noise) and divides the result
            # by 1 - s_N: a LATENT at sigma s holds x_s / (1 - s), so a state at s = 1 has none.
            if space == FLOW and float(sigmas[-1]) >= 1:
                fail(NODE, "sigmas", "for a flow model (SD3, Flux) the inversion must end below sigma = 1, where the "
                                     "host's LATENT cannot hold the state (it divides by 1 - sigma): stop one notch "
                                     "below 1 (SplitSigmas at step 1 on the schedule, then FlipSigmas), or use the "
                                     "Invert node")
            sig = sigmas.clone()
            if float(sig[0]) <= FLIPPED_ZERO:
                if space == FLOW:
                    x = x / (1 - float(sig[0]))  # the latent itself: the state at sigma 0
                sig[0] = 0
            # The state x_N is returned as is: the host's division makes it the LATENT x_N / (1 - s_N),
            # which KSAMPLER (any sampler, DisableNoise) turns back into x_N at s_N.
            inv = named(NODE, invert, method, model, x, sig, extra_args, callback, space=space, **kwargs)
            split.remember(sig, inv.sigmas, inv.latent)
            # On the host's sampling node, which runs this SAMPLER: the calls and, where any, the unconverged steps.
            text = summary(inv)
            tell(f"{NODE}: {text}")
            logging.log(logging.WARNING if inv.unconverged else logging.INFO, "%s: %s", NODE, text)
            return inv.latent
        down = split.down(sigmas, x)
        if down is not None:
            sigmas, callback = down, _at_base(sigmas, callback)
        fn, kw = sampler_for(METHODS[method].sampler, kwargs)
        return named(NODE, fn, model, x, sigmas, extra_args, callback, space=space, **kw)
    return sample


class InversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_InversionSampler",
            display_name="Inversion Sampler",
            category="sampling/inversion",
            description="A SAMPLER for SamplerCustomAdvanced: with ascending sigmas (FlipSigmas) it inverts with the "
                        "chosen method, with descending sigmas it samples deterministically with the method's own "
                        "sampler (Euler/DDIM; RF-Solver and FireFlow use their own). Use DisableNoise. Flow models "
                        "(SD3, Flux): the host divides the result by 1 - sigma, so end the inversion one notch below "
                        "sigma = 1 (SplitSigmas at step 1, then FlipSigmas) and resume from that sigma. BDIA and "
                        "EDICT need their pair of states and are only in Invert/Reconstruct.",
            inputs=[io.Combo.Input("method", options=SINGLE, default=DEFAULT,
                                   tooltip=widgets.method_help(SINGLE)),
                    *widgets.inputs(SINGLE)],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="For SamplerCustomAdvanced: inverts with ascending (FlipSigmas) sigmas, samples deterministically with descending ones.")],
        )

    @classmethod
    def execute(cls, method, **settings):
        if method not in SINGLE:
            fail(NODE, "method", f"expected one of {', '.join(SINGLE)}, got {method!r}")
        return io.NodeOutput(comfy.samplers.KSAMPLER(_function(method, widgets.values(method, settings))))
