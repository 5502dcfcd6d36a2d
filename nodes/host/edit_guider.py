"""The host's side of the edit denoiser contract: a guider holding the source and target prompts.

``EditGuider.model(den)`` turns the denoiser a sampler receives from the host into the
solvers' edit contract ``model(x, sigma, branch=, scale=) -> Prediction``
(``solvers/editing/guidance.py``). Each call hands its request down as a value: a ``Call``
in the model options (branch, scale, and a fresh attention capture in the transformer
options where words are edited). A scalar scale goes through the host's own
``sampling_function`` (hooks, the cfg-1 shortcut, patches); without one, ``calc_cond_batch``
gives both halves and ``Prediction.mix`` guides them at the editor's per-pixel scale
through the host's ``cfg_function``. Calls go through the guider's ``outer_predict_noise``,
so the host's predict-noise wrappers still apply.
"""

from __future__ import annotations

import comfy.samplers

from ...solvers.editing.guidance import SOURCE, Prediction
from . import attention
from .inputs import check_conditioning, fail, negative_for

REQUEST = "inversion_suite_edit"  # model option: the Call being evaluated
NO_ATTENTION = ("no attention on the edited words could be read from this model (it has neither UNet "
                "cross-attention nor text attention the pack can read): connect a MASK and set mask_mode to replace")


def build(node, model, capture, source, target, negative):
    """The checked prompts in an ``EditGuider`` over ``model`` (the capture already attached)."""
    check_conditioning(node, target, "target")
    negative = negative_for(node, source, negative, "source")
    g = EditGuider(model, node, capture if capture is not None and capture.active() else None)
    g.inner_set_conds({"positive": source, "target": target, "negative": negative})
    if capture is not None:
        capture.context({"source": source[0][0].shape[1], "target": target[0][0].shape[1]})
    return g


class Call:
    """One branch evaluation: what is asked (``branch``, ``scale``, the attention ``capture``) and,
    with no scale, the halves it gave (``halves``)."""

    def __init__(self, branch: str, scale, capture=None):
        self.branch, self.scale, self.capture, self.halves = branch, scale, capture, None

    def maps(self):
        return () if self.capture is None else tuple(self.capture.maps)


class Halves(Prediction):
    """Both halves of a host call; ``mix`` runs the host's ``cfg_function``, so the model's cfg
    patches (sampler_cfg_function, post-cfg functions) see the per-pixel scale too."""

    def __init__(self, inner, x, timestep, options, prompts, uncond, cond, maps=()):
        super().__init__(uncond=uncond, cond=cond, maps=maps)
        self.inner, self.x, self.timestep, self.options, self.prompts = inner, x, timestep, options, prompts

    def mix(self, w):
        return comfy.samplers.cfg_function(self.inner, self.cond, self.uncond, w.to(self.x), self.x, self.timestep,
                                           model_options=self.options, cond=self.prompts[0], uncond=self.prompts[1])


class EditGuider(comfy.samplers.CFGGuider):
    def __init__(self, model, node: str, capture=None):
        super().__init__(model)
        self.node, self.capture = node, capture

    def model(self, den):
        """The edit contract over ``den``, the host's denoiser: the guider with the run's options
        (``functools.partial``), whose model options each call extends with its ``Call``."""
        base = den.keywords["model_options"]

        def edit_model(x, sigma, branch=SOURCE, scale=1.0):
            call = Call(branch, scale, None if self.capture is None else self.capture.call(branch))
            options = dict(base, **{REQUEST: call})
            if call.capture is not None:
                options["transformer_options"] = dict(base.get("transformer_options", {}),
                                                      **{attention.KEY: call.capture})
            out = den(x, sigma, model_options=options)
            if call.capture is not None and call.capture.tokens[branch] and not call.capture.maps:
                fail(self.node, "model", NO_ATTENTION)
            return call.halves if scale is None else Prediction(out, maps=call.maps())
        return edit_model

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        call = model_options.get(REQUEST) or Call(SOURCE, 1.0)
        cond = self.conds["positive" if call.branch == SOURCE else "target"]
        neg = self.conds.get("negative")
        if call.scale is not None:
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, neg, cond, float(call.scale),
                                                    model_options=model_options, seed=seed)
        c, u = comfy.samplers.calc_cond_batch(self.inner_model, [cond, neg], x, timestep, model_options)
        call.halves = Halves(self.inner_model, x, timestep, model_options, (cond, neg), u, c, call.maps())
        return c
