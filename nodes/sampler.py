"""InversionSampler: the single-state methods as a SAMPLER for SamplerCustomAdvanced graphs."""

import comfy.samplers
from comfy_api.latest import io

from ..solvers import METHODS, invert, sampler_for
from . import settings
from .host import fail, space_of

SINGLE = [name for name, m in METHODS.items() if m.sampler == "euler"]
FLIPPED_ZERO = 1e-4  # FlipSigmas replaces a leading 0 by this


def _function(method, kwargs):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        space = space_of(model.inner_model.model_patcher, "InversionSampler")  # model: the host's KSampler wrapper of the guider
        if sigmas[0] < sigmas[-1]:
            if space == "flow" and float(sigmas[-1]) >= 1:
                raise ValueError("InversionSampler: inverting a flow model up to sigma = 1 through SamplerCustomAdvanced "
                                 "ends in a division by 1 - sigma in the host; use the Invert node")
            sig = sigmas.clone()
            if float(sig[0]) <= FLIPPED_ZERO:
                sig[0] = 0
            return invert(method, model, x, sig, extra_args, callback, space=space, **kwargs).latent
        fn, kw = sampler_for(METHODS[method].sampler, kwargs)
        return fn(model, x, sigmas, extra_args, callback, space=space, **kw)
    return sample


class InversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_InversionSampler",
            display_name="Inversion Sampler",
            category="sampling/inversion",
            description="A SAMPLER for SamplerCustomAdvanced: with ascending sigmas (FlipSigmas) it inverts with the "
                        "chosen method, with descending sigmas it samples deterministically (Euler/DDIM). Use "
                        "DisableNoise. EPS and v-prediction models only: for flow models (SD3, Flux) the host "
                        "divides by 1 - sigma at sigma = 1, so use the Invert node there. BDIA and EDICT need "
                        "their pair of states and are only in Invert/Reconstruct.",
            inputs=[io.Combo.Input("method", options=SINGLE, default="aidi_anderson",
                                   tooltip=" ".join(f"{n}: {METHODS[n].summary}" for n in SINGLE)),
                    *settings.inputs(SINGLE)],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="For SamplerCustomAdvanced: inverts with ascending (FlipSigmas) sigmas, samples deterministically with descending ones.")],
        )

    @classmethod
    def execute(cls, method, **widgets):
        if method not in SINGLE:
            fail("InversionSampler", "method", f"expected one of {', '.join(SINGLE)}, got {method!r}")
        return io.NodeOutput(comfy.samplers.KSAMPLER(_function(method, settings.values(method, widgets))))
