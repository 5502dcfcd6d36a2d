"""Running a solver under the host's guider: schedules, progress, and the model's latent scaling.

A node hands ``run_guider`` a job ``job(denoiser, x, inner_model)``; the host's guider calls
it where it would call a sampler, so the host's conditioning, batching of cond and uncond,
patches and model loading all apply. ``x`` arrives, and the job's tensors leave, in the
model's space; ``to_vae`` and ``to_model`` convert them to and from the LATENT's scale.
"""

from __future__ import annotations

import functools
import sys

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ...solvers import NonFiniteError, SolverError
from .inputs import negative_for


def sigmas_for(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The host's sampling schedule (as KSampler builds it, denoise included), reversed for inversion."""
    ms = model.get_model_object("model_sampling")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sig = comfy.samplers.calculate_sigmas(ms, scheduler, total).cpu()[-(steps + 1):]
    return sig.flip(0).to(torch.float64)


def progress(model, steps: int):
    """A solver callback that advances the progress bar, shows previews and honours interrupts."""
    preview = latent_preview.prepare_callback(model, steps)

    def callback(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x0 = d.get("denoised")
        preview(d["i"], d["x"] if x0 is None else x0, d["x"], steps)
    return callback


def tell(text: str) -> bool:
    """Shows ``text`` on the node the host is running (a SAMPLER runs inside the host's sampling node,
    whose id only the executing context knows), where a server is up; returns whether it was sent."""
    from comfy_execution.utils import get_executing_context
    # The host's server module where the host runs one (main.py imports it); a bare executor has none.
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    here = get_executing_context()
    if here is None or server is None:
        return False
    server.send_progress_text(text, here.node_id)
    return True


class _Run(comfy.samplers.Sampler):
    """Runs ``job(denoiser, x, model_space)`` where the guider hands a sampler its denoiser.

    Going through ``CFGGuider.sample`` keeps the host's conditioning, batching of cond and
    uncond, patches and model loading, and skips KSAMPLER's noise scalings (which divide by
    ``1 - sigma`` for flow models). ``x`` arrives, and the job's tensors leave, in the
    model's space; ``process_latent_in/out`` convert them.
    """

    def __init__(self, job):
        self.job = job
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        # A partial, so that a call may extend the run's model options (the edit guider's request).
        self.result, out = self.job(functools.partial(model_wrap, **extra_args), latent_image, model_wrap.inner_model)
        return out


def run_guider(node: str, guider, samples: torch.Tensor, sigmas: torch.Tensor, job):
    """Run ``job`` under ``guider``; returns (job's result, its output latent in VAE scale).

    Solver errors get the node's name here (``named``, the one place they get it): callers let them through.
    """
    run = _Run(job)
    with torch.no_grad():
        out = named(node, guider.sample, torch.zeros_like(samples), samples, run, sigmas.to(torch.float32),
                    disable_pbar=True, seed=0)
    return run.result, out.to(comfy.model_management.intermediate_device())


def named(node: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, its solver errors given ``node``'s name (once)."""
    try:
        return call(*args, **kwargs)
    except (SolverError, NonFiniteError) as e:
        if str(e).startswith(f"{node}: "):
            raise
        raise type(e)(f"{node}: {e}") from e


def guided(node: str, model, positive, negative, cfg: float, samples: torch.Tensor, sigmas: torch.Tensor, job):
    """Run ``job`` under the host's CFG guider with these prompts."""
    negative = negative_for(node, positive, negative)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return run_guider(node, guider, samples, sigmas, job)


def to_vae(inner, t):
    """A model-space tensor, as a LATENT holds it, on the host's intermediate device."""
    if t is None:
        return None
    return inner.process_latent_out(t.to(torch.float32)).to(comfy.model_management.intermediate_device())


def to_model(inner, t, like):
    return None if t is None else inner.process_latent_in(t.to(like.device, like.dtype))
