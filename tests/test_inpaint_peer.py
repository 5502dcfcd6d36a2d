"""The edit benchmark's inpainting peer is the host's own: KSampler over a latent with a noise mask.

``benchmarks/editing.py`` restates core inpainting (VAE Encode -> Set Latent Noise Mask ->
KSampler euler at denoise d) and DifferentialDiffusion from the host's rules. Here the host
runs its graph (SetLatentNoiseMask -> [DifferentialDiffusion] -> KSampler) through its own
executor on a tiny real model, and the benchmark's ``inpaint`` runs the same model through the
host's guider (``nodes.host.run.guided``: the same denoiser, conditioning and cfg), fed the
host's seeded noise and schedule. The two outputs agree to float32 rounding: a relative
difference of at most 1e-6 (measured: 0, bit for bit, on 0.3.64 and 0.33.0).
"""

import importlib

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch
from comfy_host import tiny_model, vae_scale

import comfy.sample
from inversion_suite.benchmarks import editing
from inversion_suite.nodes.host.run import guided, sigmas_for

STEPS, CFG, SEED = 6, 3.0, 7
SCHEDULER = {"eps": "karras", "flow": "simple"}
BOUND = 1e-6  # relative, against the host's largest value


def latent(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g)


def masks():
    """The benchmark's region (the right half) and its feathered edge, at the latent's size."""
    hard = torch.zeros(1, 1, 8, 8)
    hard[..., 4:] = 1
    return hard, editing.feathered(hard, 2)


def host_inpaint(model, samples, mask, denoise, differential, monkeypatch):
    """The host's graph through its executor: SetLatentNoiseMask -> [DifferentialDiffusion] -> KSampler."""
    importlib.import_module("utils.extra_config")  # before the host's nodes.py, as main.py does
    import nodes as core
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

    kept = {}

    class Inputs:
        CATEGORY, FUNCTION = "test", "run"
        RETURN_TYPES = ("MODEL", "LATENT", "CONDITIONING", "CONDITIONING", "MASK")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return model, {"samples": samples}, comfy_host.prompt(1), comfy_host.prompt(2), mask[:, 0]

    class Keep:
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "test", "run", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}}

        def run(self, samples):
            kept.update(samples)
            return {}

    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestInputs", Inputs)
    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestKeep", Keep)
    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "DifferentialDiffusion", DifferentialDiffusion)
    graph = {"1": {"class_type": "TestInputs", "inputs": {}},
             "2": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["1", 1], "mask": ["1", 4]}},
             "3": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0]}},
             "4": {"class_type": "KSampler",
                   "inputs": {"model": ["3" if differential else "1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                              "sampler_name": "euler", "scheduler": SCHEDULER[kind_of(model)],
                              "positive": ["1", 2], "negative": ["1", 3], "latent_image": ["2", 0],
                              "denoise": denoise}},
             "5": {"class_type": "TestKeep", "inputs": {"samples": ["4", 0]}}}
    if not differential:
        del graph["3"]
    ex = comfy_host.execute_graph(graph)
    assert ex.success, ex.status_messages
    return kept


def kind_of(model):
    return "flow" if model.model.model_type == comfy_host.TYPES["flow"] else "eps"


def peer_inpaint(model, samples, mask, denoise, differential):
    """The benchmark's rule under the host's guider, with KSampler's schedule and seeded noise."""
    kind = kind_of(model)
    sigmas = sigmas_for(model, SCHEDULER[kind], STEPS, denoise).flip(0).float()
    noise = comfy.sample.prepare_noise(samples, SEED)
    assert torch.equal(noise, editing.seeded_noise(samples.shape, SEED))  # the benchmark's draw is the host's

    def job(den, x, inner):
        ms = inner.model_sampling
        top = abs(float(sigmas[0]) - float(ms.sigma_max)) <= 1e-5 * float(ms.sigma_max) or \
            float(sigmas[0]) > float(ms.sigma_max)  # the host's max_denoise
        out, calls = editing.inpaint(den, x, noise, sigmas, mask, space=kind, max_denoise=top,
                                     sampling=ms if differential else None)
        return calls, out

    calls, out = guided("test", model, comfy_host.prompt(1), comfy_host.prompt(2), CFG, samples, sigmas.double().flip(0),
                        job)
    assert calls == STEPS
    return out


@pytest.mark.parametrize("differential", [False, True], ids=["inpaint", "differential"])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_benchmarks_inpainting_is_the_hosts_ksampler_with_a_noise_mask(kind, denoise, differential, monkeypatch):
    model = tiny_model(kind)
    samples = vae_scale(model, latent())
    hard, soft = masks()
    mask = soft if differential else hard
    host = host_inpaint(model, samples, mask, denoise, differential, monkeypatch)["samples"]
    peer = peer_inpaint(model, samples, mask, denoise, differential)
    diff = float((host - peer).abs().max() / host.abs().max())
    print(f"{kind} denoise {denoise} {'DifferentialDiffusion' if differential else 'plain'}: relative {diff:.1e}")
    assert diff <= BOUND
    # the edit is real; plain inpainting keeps the background (to the host's own rounding). With
    # DifferentialDiffusion it does not: where the schedule's last sigma is the model's sigma_min
    # (karras) the threshold reaches 0 and the last call denoises every pixel.
    assert float((host - samples)[hard.expand_as(host) > 0.5].abs().max()) > 1e-2
    if not differential:
        assert float((host - samples)[hard.expand_as(host) == 0].abs().max()) <= 1e-5 * float(samples.abs().max())


def test_the_benchmarks_schedule_tables_are_the_hosts():
    """DifferentialDiffusion reads the model's timesteps: the benchmark's EPS table is SD1.x's."""
    ms = tiny_model("eps").get_model_object("model_sampling")
    table = editing.Discrete()
    assert torch.equal(table.sigmas, ms.sigmas) and torch.equal(table.log_sigmas, ms.log_sigmas)
    s = torch.tensor([14.6, 3.0, 0.5, 0.0292, 0.03])
    assert torch.equal(table.timestep(s), ms.timestep(s))
