"""Model reach: every method through Invert/Reconstruct on each family's own host classes.

Each family is built tiny from the host's own config class, ``model_base`` class and
network (``comfy_host.tiny_*``) with random weights, so its conditioning (SDXL's ADM vector,
SD3's pooled vector and joint context), latent format (5D for Wan and Qwen-Image), model
sampling and attention layout are the real ones. A round trip is measured in the model's
space; exact methods must return the latent to float rounding, iterative ones to their
tolerance and approximate ones within a bound measured here (random weights are harder than
a trained model's smooth field). Run with ``-s`` to print the table the README shows.
"""

import math

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch
from comfy_host import flux_prompt, run_invert, text_prompt, tiny_flux, tiny_qwen, tiny_sd3, tiny_sdxl, tiny_wan, tiny_wan22
from measure import rel

import comfy.model_base
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip
from inversion_suite.nodes.host import attention, tokens
from inversion_suite.nodes.blended_guidance import BlendedGuidanceSampler
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.invert import Invert
from inversion_suite.nodes.reconstruct import Reconstruct
from inversion_suite.nodes.inversion_sampler import SINGLE, InversionSampler
from inversion_suite.solvers import METHODS


def _qwen_tokenizer():
    import comfy.text_encoders.qwen_image

    return comfy.text_encoders.qwen_image.QwenImageTokenizer


# family: (builder, latent shape in VAE scale, prompt(seed), scheduler, tokenizer for words or None)
FAMILIES = {
    "sdxl": (lambda std=0.05: tiny_sdxl(std=std, out_scale=0.1), (1, 4, 8, 8), lambda s: text_prompt(s, tokens=77), "karras",
             lambda: comfy.sdxl_clip.SDXLTokenizer),
    "sd3.5": (tiny_sd3, (1, 16, 8, 8), lambda s: text_prompt(s, tokens=154), "simple",
              lambda: comfy.text_encoders.sd3_clip.SD3Tokenizer),
    "flux": (lambda std=0.05: tiny_flux(std=std), (1, 16, 8, 8), lambda s: flux_prompt(s, tokens=32), "simple",
             lambda: comfy.text_encoders.flux.FluxTokenizer),
    "wan2.1": (tiny_wan, (1, 16, 3, 8, 8), lambda s: text_prompt(s, pooled=False), "simple", None),
    "wan2.2": (tiny_wan22, (1, 48, 2, 8, 8), lambda s: text_prompt(s, pooled=False), "simple", None),
    "qwen-image": (tiny_qwen, (1, 16, 1, 8, 8), lambda s: text_prompt(s, tokens=32, pooled=False), "simple",
                   _qwen_tokenizer),
}
MODEL_CLASS = {"sdxl": "SDXL", "sd3.5": "SD3", "flux": "Flux", "wan2.1": "WAN21", "wan2.2": "WAN22", "qwen-image": "QwenImage"}
STEPS = 6
TIGHT = {"aidi_anderson": dict(tol=1e-6, iterations=60), "fixed_point": dict(tol=1e-6, iterations=100),
         "aidi_empirical": dict(tol=1e-6, iterations=100), "renoise": dict(iterations=20)}
# Relative round-trip error bounds (model space): exact methods to float32 rounding,
# iterative ones to their tolerance, approximate ones measured on these models (worst
# family, about 2x headroom).
BOUNDS = {"bdia": 1e-5, "edict": 1e-5, "aidi_anderson": 1e-4, "fixed_point": 1e-3, "aidi_empirical": 1e-3,
          "renoise": 0.6, "ddim": 0.6, "easyinv": 0.6, "naive_unsample": 0.6, "rf_solver": 0.1, "fireflow": 0.15}
SOURCE_TEXT, TARGET_TEXT = "a photo of a cat on a sofa", "a photo of a dog on a sofa"
# Weight scale for the edit test: larger weights sharpen attention, except under SD3.5's
# RMS-normed q and k, where they flatten it.
EDIT_STD = {"sd3.5": 0.05}
_models = {}


def built(name):
    """The family's tiny model, built once per session; None where this host lacks its class."""
    if name not in _models:
        _models[name] = FAMILIES[name][0]()
    return _models[name]


def family(name):
    model = built(name)
    if model is None:
        pytest.skip(f"this ComfyUI has no {MODEL_CLASS[name]} model class")
    return model


def source(name, seed=4):
    """A LATENT whose model-space samples have unit scale, as a VAE's do after process_latent_in."""
    x = torch.randn(FAMILIES[name][1], generator=torch.Generator().manual_seed(seed))
    return {"samples": family(name).model.process_latent_out(x)}


def invert(model, name, method, latent, steps=STEPS, denoise=1.0, **settings):
    return run_invert(model, latent, FAMILIES[name][2](1), method, steps, FAMILIES[name][3], denoise=denoise,
                      keep_trajectory=False, **settings)


def test_each_family_runs_on_its_own_host_classes():
    for name in FAMILIES:
        model = built(name)
        if model is None:
            continue
        assert type(model.model).__name__ == MODEL_CLASS[name]
        want = "EPS" if name == "sdxl" else "CONST"
        assert isinstance(model.get_model_object("model_sampling"), getattr(comfy.model_sampling, want))
        # UNet cross-attention (attn2 patches) on SDXL only; the DiTs go through the attention override.
        assert bool(attention.unet_layers(model)) == (name == "sdxl")


def denoised(model, name, cond, sigma_index=2):
    """The host's guided x0 prediction for one prompt (cfg 1) on a fixed latent."""
    ms = model.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(ms, FAMILIES[name][3], 4).cpu()[sigma_index:sigma_index + 1]
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(cond, cond)
    g.set_cfg(1.0)
    seen = {}

    class Once(comfy.samplers.Sampler):
        def sample(self, wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            seen["x0"] = wrap(latent_image, sigmas[:1], **extra_args)
            return latent_image

    x = source(name)["samples"]
    g.sample(torch.zeros_like(x), x, Once(), torch.cat([sigma, sigma.new_zeros(1)]), disable_pbar=True, seed=0)
    return seen["x0"]


@pytest.mark.parametrize("name", ["sdxl", "sd3.5", "flux"])
def test_the_pooled_vector_reaches_the_network(name):
    """SDXL's ADM input y = [pooled, size embeddings] and SD3/Flux's pooled vector are live conditioning."""
    model = family(name)
    cond = FAMILIES[name][2](1)
    other = [[cond[0][0], {**cond[0][1], "pooled_output": cond[0][1]["pooled_output"] + 1}]]
    a, b = denoised(model, name, cond), denoised(model, name, other)
    assert torch.isfinite(a).all() and rel(b, a) > 1e-4  # float rounding is about 1e-7
    assert torch.equal(a, denoised(model, name, cond))  # deterministic, as exact inversion needs


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_method_round_trips_on_every_family(name, method):
    model = family(name)
    latent = source(name)
    inverted = invert(model, name, method, latent, **TIGHT.get(method, {}))
    assert inverted["samples"].shape == latent["samples"].shape
    out = Reconstruct.execute(model=model, inverted=inverted, positive=FAMILIES[name][2](1), cfg=-1.0).result[0]
    inner = model.model
    err = rel(inner.process_latent_in(out["samples"]), inner.process_latent_in(latent["samples"]))
    print(f"\nREACH {name} {method} {err:.3g}")
    assert math.isfinite(err) and err <= BOUNDS[method], f"{name} {method}: round-trip error {err:.3g}"


def clip_of(tokenizer):
    """The host's CLIP object holding a family's real tokenizer, loaded offline (the nodes only tokenize)."""
    c = comfy.sd.CLIP(no_init=True)
    c.tokenizer = tokenizer()
    c.tokenizer_options = {}
    return c


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[4] is not None])
def test_edited_words_sit_where_the_conditioning_holds_them(name):
    """The positions the capture reads are the edited word's positions in the context the text
    encoder hands the model. The two prompts differ in one word, so the oracle is where their
    token lists differ, each tokenized without a template. Qwen-Image's encoder drops its chat
    template's head (the host cuts at the second <|im_start|>, plus 'user' and a newline)."""
    family(name)
    clip = clip_of(FAMILIES[name][4]())
    key = "t5xxl" if name == "flux" else None
    found, counts = tokens.edited("N", clip, SOURCE_TEXT, TARGET_TEXT, "", key)
    cap = attention.Capture(found, counts, (8, 8))

    def listed(text, **kw):
        t = clip.tokenize(text, **kw)
        return [x[0] for chunk in t[key if key in t and "g" not in t else ("l" if "l" in t else next(iter(t)))]
                for x in chunk]

    if name == "qwen-image":
        ids = listed(SOURCE_TEXT)
        head = [i for i, t in enumerate(ids) if t == 151644][1] + 3  # the host's template_end
        src, tgt = listed(SOURCE_TEXT, llama_template="{}"), listed(TARGET_TEXT, llama_template="{}")
        assert ids[head:head + len(src)] == src  # what the model sees starts with the text
        context = len(ids) - head
    else:
        src, tgt = listed(SOURCE_TEXT), listed(TARGET_TEXT)
        context = len(src)
    cap.context({"source": context, "target": context})
    differ = [i for i, (a, b) in enumerate(zip(src, tgt)) if a != b]
    assert len(differ) == 1 and cap.tokens == {"source": differ, "target": differ}, (cap.tokens, differ)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[4] is not None])
def test_edit_region_from_words_on_each_text_attention_family(name, monkeypatch):
    family(name)
    model = FAMILIES[name][0](std=EDIT_STD.get(name, 0.3))  # attention that is not uniform over the image
    latent = source(name)
    inv = invert(model, name, "bdia", latent)
    added = []
    add = attention.Capture.add
    monkeypatch.setattr(attention.Capture, "add", lambda self, f, m: (added.append((self.branch, f)), add(self, f, m)))
    edited, mask = BlendedGuidanceSampler.execute(
        model=model, inverted=inv, source=FAMILIES[name][2](1), target=FAMILIES[name][2](2), cfg_inversion=-1.0,
        cfg_edit=3.0, mask_steps=1.0, local_blend=False, clip=clip_of(FAMILIES[name][4]()),
        source_text=SOURCE_TEXT, target_text=TARGET_TEXT, words="", threshold=0.9, dilation=0).result
    h, w = latent["samples"].shape[-2:]
    assert mask.shape == (1, 8 * h, 8 * w) and torch.isfinite(mask).all()
    # The words' attention was read from the model on both branches and shaped a region.
    assert {b for b, _ in added} == {"source", "target"}
    assert 0 < float(mask.mean()) < 1
    assert torch.isfinite(edited["samples"]).all() and edited["samples"].shape == latent["samples"].shape


# --- InversionSampler on flow models ------------------------------------------------------------

def guider(model, name):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(FAMILIES[name][2](1), FAMILIES[name][2](9))
    g.set_cfg(1.0)
    return g


def flipped(sigmas):
    """What FlipSigmas makes of a schedule."""
    s = sigmas.flip(0).clone()
    if s[0] == 0:
        s[0] = 1e-4
    return s


@pytest.mark.parametrize("method", ["ddim", "aidi_anderson"])
@pytest.mark.parametrize("name", ["sd3.5", "flux"])
def test_inversion_sampler_inverts_flow_models_one_notch_below_one(name, method):
    model = family(name)
    latent = source(name)["samples"]
    ms = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(ms, FAMILIES[name][3], STEPS + 1).cpu()
    assert float(full[0]) == 1.0
    low = full[1:]  # SplitSigmas at step 1: the schedule one notch below sigma = 1
    settings = TIGHT.get(method, {})
    sampler = InversionSampler.execute(method=method, **settings).result[0]
    zero = torch.zeros_like(latent)
    up = guider(model, name).sample(zero, latent, sampler, flipped(low), disable_pbar=True, seed=0)
    # Invert over the same sigmas: a denoise with int(steps / denoise) = steps + 1.
    node = invert(model, name, method, {"samples": latent}, denoise=STEPS / (STEPS + 1.5), **settings)
    inner, top = model.model, float(low[0])
    state = inner.process_latent_in(node["samples"])
    # The host's LATENT at sigma s holds x_s / (1 - s): the sampler's output is the node's state so scaled.
    assert rel(inner.process_latent_in(up) * (1 - top), state) <= 1e-5
    # Resuming with the unflipped schedule (DisableNoise) returns to the source, as Reconstruct does.
    down = guider(model, name).sample(zero, up, sampler, low, disable_pbar=True, seed=0)
    back = Reconstruct.execute(model=model, inverted=node, positive=FAMILIES[name][2](1), cfg=-1.0).result[0]
    assert rel(down, back["samples"]) <= 1e-5
    print(f"\nSAMPLER {name} {method} {rel(inner.process_latent_in(down), inner.process_latent_in(latent)):.3g}")


@pytest.mark.parametrize("name", ["sd3.5", "flux"])
def test_inversion_sampler_refuses_flow_up_to_sigma_one_before_any_evaluation(name):
    model = family(name)
    latent = source(name)["samples"]
    calls = []
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda apply, args: (calls.append(1), apply(args["input"], args["timestep"], **args["c"]))[1])
    sigmas = flipped(comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "simple", 4).cpu())
    sampler = InversionSampler.execute(method="ddim").result[0]
    with pytest.raises(NodeInputError, match=r"^InversionSampler: input 'sigmas': .*below sigma = 1.*SplitSigmas"):
        guider(m, name).sample(torch.zeros_like(latent), latent, sampler, sigmas, disable_pbar=True, seed=0)
    assert calls == []


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_every_sampler_callback_carries_a_denoised_tensor(name):
    """The host's KSAMPLER reads ``denoised.shape`` on the first step (ComfyUI 0.33)."""
    model = family(name)
    latent = source(name)["samples"]
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, FAMILIES[name][3], 4).cpu()
    if name == "flux":
        sigmas = sigmas[1:]
    for method in SINGLE:  # every method InversionSampler offers, each direction
        seen = []
        sampler = InversionSampler.execute(method=method).result[0]
        for sig in (flipped(sigmas), sigmas):
            guider(model, name).sample(torch.zeros_like(latent), latent, sampler, sig, disable_pbar=True, seed=0,
                                       callback=lambda i, den, x, total: seen.append((i, den, x)))
        assert len(seen) == 2 * (len(sigmas) - 1)
        assert all(isinstance(den, torch.Tensor) and den.shape == x.shape for _, den, x in seen), method


# --- model sampling types the pack refuses ------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [("IMG_TO_IMG_FLOW", "image-to-image mapping"),
                                          ("V_PREDICTION_DDPM", "DDPM state")])
def test_model_sampling_types_that_are_not_x0_plus_sigma_eps_are_refused(kind, reason):
    if not hasattr(comfy.model_base.ModelType, kind):
        pytest.skip(f"this ComfyUI has no {kind} model sampling")
    config = comfy.supported_models.SD15(dict(comfy_host.UNET))
    model = comfy_host.patched(comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, kind),
                                                          device=torch.device("cpu")), 0, 0.05)
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    with pytest.raises(NodeInputError, match=rf"^Invert: input 'model': model sampling type {kind} is not "
                                             rf"supported: .*{reason}.*EPS, V_PREDICTION, EDM, X0 or flow"):
        Invert.execute(model=model, latent=latent, positive=comfy_host.prompt(1), method="ddim", steps=4,
                       scheduler="normal", cfg=1.0, denoise=1.0, keep_trajectory=False)
    sampler = InversionSampler.execute(method="ddim").result[0]
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(comfy_host.prompt(1), comfy_host.prompt(2))
    g.set_cfg(1.0)
    sigmas = flipped(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu())
    with pytest.raises(NodeInputError, match=rf"^InversionSampler: input 'model': model sampling type {kind}"):
        g.sample(torch.zeros_like(latent["samples"]), latent["samples"], sampler, sigmas, disable_pbar=True, seed=0)


# --- FlowEdit on every family ----------------------------------------------------------------------

def with_count(model):
    """A clone of ``model`` that counts its network evaluations."""
    m, calls = model.clone(), [0]

    def wrapper(apply_model, args):
        calls[0] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


def latent_editors():
    from inversion_suite.nodes.flowedit import FlowEdit
    from inversion_suite.nodes.rf_inversion import RFInversionEdit
    # node, its own inputs for 6 steps, its model calls there
    return {"flowedit": (FlowEdit, dict(n_max=5, n_min=1, n_avg=1, noise="antithetic", composite="at the end"),
                         2 * 4 + 1),
            "flowedit paper": (FlowEdit, dict(n_max=5, n_min=1, n_avg=1, noise="independent",
                                                composite="every step"), 2 * 4 + 1),
            "rf_inversion": (RFInversionEdit, dict(gamma=0.5, eta=0.9, start_step=0, stop_step=3), 2 * 6)}


@pytest.mark.parametrize("editor", ["flowedit", "flowedit paper", "rf_inversion"])
@pytest.mark.parametrize("name", ["sd1.5", *FAMILIES])
def test_latent_editors_on_each_family_keep_what_their_mask_leaves(name, editor):
    """FlowEdit (antithetic, the default, and the paper's draws) and RF-Inversion through their nodes on
    each family's own host classes, 4D and 5D latents: inside a MASK the image changes, outside it stays
    the source (to the latent format's rounding); the region shown is the MASK feathered by the default
    one latent pixel."""
    from comfy_host import prompt, tiny_model
    node, own, expected = latent_editors()[editor]
    if name == "sd1.5":
        base, latent, make, sched = tiny_model("eps"), {"samples": torch.randn(1, 4, 8, 8) * 0.18}, prompt, "karras"
    else:
        base, latent, make, sched = family(name), source(name), FAMILIES[name][2], FAMILIES[name][3]
    model, calls = with_count(base)
    x = latent["samples"]
    mask = torch.zeros(1, 64, 64)
    mask[..., 32:] = 1
    if x.ndim == 5:  # a video: one MASK for every frame
        mask = mask[:1]
    edited, shown = node.execute(model=model, latent=latent, source=make(1), target=make(2), steps=6,
                                 scheduler=sched, cfg_source=1.5, cfg_target=4.0, seed=1, mask=mask, **own).result
    y = edited["samples"]
    assert y.shape == x.shape and torch.isfinite(y).all() and calls[0] == expected
    assert rel(y[..., :4], x[..., :4]) < 1e-6 and rel(y[..., 4:], x[..., 4:]) > 1e-3, name
    right = shown[..., shown.shape[-1] // 2:]  # the mask at image size (Wan 2.2: 16 pixels a latent pixel)
    f = shown.shape[-1] // x.shape[-1]  # image pixels a latent pixel
    assert torch.equal(right[..., f:], torch.ones_like(right[..., f:])) and (right[..., :f] == 0.5).all()


@pytest.mark.parametrize("editor", ["flowedit", "rf_inversion"])
@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[4] is not None])
def test_latent_editors_region_from_words(name, editor, monkeypatch):
    node, own, _ = latent_editors()[editor]
    family(name)
    model = FAMILIES[name][0](std=EDIT_STD.get(name, 0.3))
    latent = source(name)
    added = []
    add = attention.Capture.add
    monkeypatch.setattr(attention.Capture, "add", lambda self, f, m: (added.append((self.branch, f)), add(self, f, m)))
    edited, mask = node.execute(model=model, latent=latent, source=FAMILIES[name][2](1), target=FAMILIES[name][2](2),
                                steps=6, scheduler=FAMILIES[name][3], cfg_source=1.0, cfg_target=3.0, seed=0,
                                clip=clip_of(FAMILIES[name][4]()), source_text=SOURCE_TEXT, target_text=TARGET_TEXT,
                                words="", threshold=0.9, dilation=0, **own).result
    assert {b for b, _ in added} == {"source", "target"} and 0 < float(mask.mean()) < 1
    assert torch.isfinite(edited["samples"]).all() and edited["samples"].shape == latent["samples"].shape
