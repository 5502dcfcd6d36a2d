"""The host's side of the edit denoiser contract: a guider holding the source and target prompts.

``EditGuider.model(den)`` turns the denoiser a sampler receives from the host into the
solvers' edit contract ``model(x, sigma, branch=, scale=) -> x0_hat``: a scalar scale goes
through the host's own ``sampling_function`` (hooks, the cfg-1 shortcut, patches), a
per-pixel one through ``calc_cond_batch`` and ``cfg_function``. Calls go through the
guider's ``outer_predict_noise``, so the host's predict-noise wrappers still apply.
"""

from __future__ import annotations

import comfy.samplers
import torch

from .inputs import check_conditioning, negative_for


def build(node, model, capture, source, target, negative):
    """The checked prompts in an ``EditGuider`` over ``model`` (the capture already attached)."""
    check_conditioning(node, target, "target")
    negative = negative_for(node, source, negative, "source")
    g = EditGuider(model, capture)
    g.inner_set_conds({"positive": source, "target": target, "negative": negative})
    if capture is not None:
        capture.context({"source": source[0][0].shape[1], "target": target[0][0].shape[1]})
    return g


class EditGuider(comfy.samplers.CFGGuider):
    def __init__(self, model, capture=None):
        super().__init__(model)
        self.capture = capture
        self.request = ("source", 1.0)
        self.seen = False  # whether a prompt branch has been evaluated yet

    def model(self, den):
        """The edit contract over ``den(x, sigma)``, the denoiser the host handed the sampler."""
        def edit_model(x, sigma, branch="source", scale=1.0):
            self.request = (branch, scale)
            return den(x, sigma)
        return edit_model

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        branch, scale = self.request
        cond = self.conds["positive" if branch == "source" else "target"]
        neg = self.conds.get("negative")
        if self.capture is not None:
            self.capture.branch = branch
        try:
            if not callable(scale) and not isinstance(scale, torch.Tensor):
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, neg, cond, float(scale),
                                                        model_options=model_options, seed=seed)
            c, u = comfy.samplers.calc_cond_batch(self.inner_model, [cond, neg], x, timestep, model_options)
            # A callable scale may depend on attention recorded during this very call.
            w = scale() if callable(scale) else scale
            w = w.to(x) if isinstance(w, torch.Tensor) else float(w)
            return comfy.samplers.cfg_function(self.inner_model, c, u, w, x, timestep, model_options=model_options,
                                               cond=cond, uncond=neg)
        finally:
            if self.capture is not None:
                self.capture.branch = None
            self.seen = True
