"""BlendedGuidanceSampler and StochasticEditSampler inside the real ComfyUI host."""

import math

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch
import torch.nn.functional as F
from comfy_host import exact_model, flux_prompt, prompt, run_invert, run_reconstruct, tiny_flux, tiny_model, vae_scale

import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.flux
from analytic import Mixture
from measure import rel
from inversion_suite.nodes.host import attention, model as host_model
from inversion_suite.nodes.blended_guidance import BlendedGuidanceSampler
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.invert import Invert
from inversion_suite.nodes.reconstruct import Reconstruct
from inversion_suite.nodes.stochastic_edit import StochasticEditSampler
from inversion_suite.solvers import METHODS
from inversion_suite.solvers.editing import masks

MIX = Mixture((4, 8, 8), components=3, seed=0)
SOURCE_TEXT, TARGET_TEXT = "a photo of a cat on a sofa", "a photo of a dog on a sofa"


def clip(tokenizer=comfy.sd1_clip.SD1Tokenizer):
    """The host's CLIP object with a real tokenizer (the nodes only tokenize)."""
    c = comfy.sd.CLIP(no_init=True)
    c.tokenizer = tokenizer()
    c.tokenizer_options = {}
    return c


def random_prompt(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, comfy_host.CONTEXT, generator=g), {}]]


def inverted(model, method="bdia", steps=6, cfg=1.0, batch=1, positive=None, scheduler="karras", **settings):
    latent = {"samples": vae_scale(model, MIX.sample(batch, seed=4).float())}
    return run_invert(model, latent, positive or prompt(1), method, steps, scheduler, cfg, **settings)


def blended(model, inv, source, target, **kw):
    args = dict(model=model, inverted=inv, source=source, target=target, cfg_inversion=-1.0, cfg_edit=5.0,
                mask_steps=1.0, local_blend=True)
    args.update(kw)
    return BlendedGuidanceSampler.execute(**args).result


def reconstruct(model, inv, positive, cfg):
    return run_reconstruct(model, inv, positive, cfg)["samples"]


def full_mask(value, size=64):
    return torch.full((1, size, size), float(value))


# --- BlendedGuidanceSampler ---------------------------------------------------------------------

def branch_of(options):
    """The branch of the call whose attention these transformer options belong to (None: not captured)."""
    rec = options.get(attention.KEY)
    return None if rec is None else rec.branch


def test_attention_mask_is_the_direct_softmax_of_the_chosen_tokens(monkeypatch):
    model = tiny_model("eps")
    inv = inverted(model, positive=random_prompt(1))
    seen = []
    hook = attention.Capture.hook

    def spy(self, q, k, v, extra):
        seen.append((branch_of(extra), q.clone(), k.clone(), dict(extra)))
        return hook(self, q, k, v, extra)

    monkeypatch.setattr(attention.Capture, "hook", spy)
    threshold = 0.995  # a random network attends almost uniformly: ratios to the maximum lie in 0.98..1
    _, mask = blended(model, inv, random_prompt(1), random_prompt(2), clip=clip(), source_text=SOURCE_TEXT,
                      target_text=TARGET_TEXT, threshold=threshold, dilation=0, feather=0)

    c = clip()
    tokens = {b: [i for i, t in enumerate(c.tokenize(text)["l"][0]) if t[0] == c.tokenize(word)["l"][0][1][0]]
              for b, text, word in (("source", SOURCE_TEXT, "cat"), ("target", TARGET_TEXT, "dog"))}
    assert tokens == {"source": [5], "target": [5]}  # <start> a photo of a cat
    maps = {}
    for branch, q, k, extra in seen:
        if branch is None:
            continue
        heads = extra["n_heads"]
        hw = (8, 8) if q.shape[1] == 64 else (4, 4)
        rows = [r for j, cu in enumerate(extra["cond_or_uncond"]) for r in range(j * (len(q) // len(extra["cond_or_uncond"])),
                (j + 1) * (len(q) // len(extra["cond_or_uncond"]))) if cu == 0]
        qh = q[rows].view(len(rows), -1, heads, q.shape[-1] // heads)
        kh = k[rows].view(len(rows), -1, heads, k.shape[-1] // heads)
        p = torch.einsum("bnhd,bthd->bhnt", qh, kh).div(math.sqrt(qh.shape[-1])).softmax(-1)
        m = p[..., tokens[branch]].sum(-1).mean(1).view(-1, 1, *hw)
        m = F.interpolate(F.max_pool2d(m, 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False)
        maps.setdefault((branch, 8 // hw[0]), []).append(m)
    assert {f for _, f in maps} == {1, 2}
    raw = sum(torch.stack(v).mean(0) for (b, f), v in maps.items() if f == 2)
    expect = (raw / raw.max() > threshold).float()
    got = F.avg_pool2d(mask[:, None], 8)
    assert torch.equal(got, expect)
    assert 0 < expect.mean() < 1


def spied(monkeypatch):
    """The (branch, q, k, kwargs) of every attention call the capture's override sees, as it sees them."""
    seen, hook = [], attention.Capture.override

    def spy(self, func, *args, **kwargs):
        seen.append((branch_of(kwargs.get("transformer_options") or {}), args[0].clone(), args[1].clone(), dict(kwargs)))
        return hook(self, func, *args, **kwargs)

    monkeypatch.setattr(attention.Capture, "override", spy)
    return seen


def word_attention(monkeypatch, model, latent, src, tgt, threshold):
    """Invert with BDIA, then one unguided Blended Guidance Edit whose region comes from the words
    of SOURCE_TEXT and TARGET_TEXT; returns (every attention call it saw, its mask)."""
    inv = Invert.execute(model=model, latent=latent, positive=src, method="bdia", steps=4, scheduler="simple",
                         cfg=1.0, denoise=1.0, keep_trajectory=True).result[0]
    seen = spied(monkeypatch)
    _, mask = blended(model, inv, src, tgt, clip=clip(comfy.text_encoders.flux.FluxTokenizer), source_text=SOURCE_TEXT,
                      target_text=TARGET_TEXT, threshold=threshold, dilation=0, feather=0, local_blend=False,
                      cfg_inversion=1.0, cfg_edit=1.0)
    return seen, mask


def test_flux_attention_mask_is_the_direct_softmax_over_the_joint_sequence(monkeypatch):
    threshold = 0.9
    model = tiny_flux()
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
    src, tgt = flux_prompt(1), flux_prompt(2)
    seen, mask = word_attention(monkeypatch, model, latent, src, tgt, threshold)
    tok = clip(comfy.text_encoders.flux.FluxTokenizer)
    where = {}
    for branch, text, word in (("source", SOURCE_TEXT, "cat"), ("target", TARGET_TEXT, "dog")):
        ids = [t[0] for t in tok.tokenize(text)["t5xxl"][0]]
        where[branch] = [i for i, t in enumerate(ids) if t == tok.tokenize(word)["t5xxl"][0][0][0]]
    assert where == {"source": [6], "target": [6]}  # T5: a(2 tokens) photo of a(2 tokens) cat
    maps = {"source": [], "target": []}
    for branch, q, k, kwargs in seen:
        if branch is None:
            continue
        assert kwargs.get("skip_reshape")  # Flux hands (B, heads, L, d)
        p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # cfg 1: cond rows only
        m = p[:, :, 16:, where[branch]].sum(-1).mean(1).view(-1, 1, 4, 4)
        maps[branch].append(F.interpolate(F.max_pool2d(m, 3, 1, 1), size=(8, 8), mode="bilinear", align_corners=False))
    # 2 attention blocks x 3 sampled steps (BDIA resumes from its pair) per branch
    assert len(maps["source"]) == len(maps["target"]) == 6
    raw = torch.stack(maps["source"]).mean(0) + torch.stack(maps["target"]).mean(0)
    expect = (raw / raw.max() > threshold).float()
    assert 0 < expect.mean() < 1
    assert torch.equal(F.avg_pool2d(mask[:, None], 8), expect)


@pytest.mark.parametrize("method", list(METHODS))
def test_same_prompt_and_scale_equals_reconstruct(method):
    model = tiny_model("eps")
    pos = random_prompt(1)
    inv = inverted(model, method, positive=pos, cfg=2.0)
    out, _ = blended(model, inv, pos, pos, cfg_edit=2.0, clip=clip(), source_text=SOURCE_TEXT, target_text=SOURCE_TEXT,
                     words="cat")
    assert torch.equal(out["samples"], reconstruct(model, inv, pos, -1.0))


def test_a_feathered_words_region_is_the_words_region_ramped():
    """With the same prompt and scale on both branches the states, and so the words' attention,
    do not depend on the region: feathered, the region the node returns is the unfeathered one
    ramped inwards, and the edit still returns the reconstruction bit for bit."""
    model = tiny_model("eps")
    pos = random_prompt(1)
    inv = inverted(model, "ddim", positive=pos, cfg=2.0)
    run = dict(cfg_edit=2.0, clip=clip(), source_text=SOURCE_TEXT, target_text=SOURCE_TEXT, words="cat",
               threshold=0.995, dilation=0)
    _, hard = blended(model, inv, pos, pos, feather=0, **run)
    out, soft = blended(model, inv, pos, pos, feather=1, grow=True, **run)
    hard, soft = F.avg_pool2d(hard[:, None], 8), F.avg_pool2d(soft[:, None], 8)
    assert torch.equal(soft, masks.feather(hard, 1)) and 0 < float((soft == 0.5).float().mean()) < 1
    assert torch.equal(out["samples"], reconstruct(model, inv, pos, -1.0))


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_mask_with_blending_keeps_the_source_branch(method):
    model = exact_model("eps", MIX)
    inv = inverted(model, method, cfg=1.0)
    out, _ = blended(model, inv, prompt(1), prompt(2), mask=full_mask(0), mask_mode="replace")
    assert torch.equal(out["samples"], reconstruct(model, inv, prompt(1), -1.0))


@pytest.mark.parametrize("value,cfg", [(0, 1.0), (1, 5.0)])
def test_uniform_masks_equal_uniform_guidance(value, cfg):
    model = exact_model("eps", MIX)
    inv = inverted(model, "aidi_anderson", cfg=1.0)
    out, mask = blended(model, inv, prompt(1), prompt(2), mask=full_mask(value), local_blend=False)
    assert torch.equal(out["samples"], reconstruct(model, inv, prompt(2), cfg))
    assert torch.equal(mask, full_mask(value))


def test_edit_region_changes_and_the_rest_stays():
    model = exact_model("eps", MIX)
    inv = inverted(model, "bdia", cfg=1.0)
    half = torch.zeros(1, 64, 64)
    half[:, :, 32:] = 1
    out, _ = blended(model, inv, prompt(1), prompt(2), mask=half)
    source = reconstruct(model, inv, prompt(1), -1.0)
    diff = (out["samples"] - source).abs()
    assert diff[..., :4].max() == 0  # local blend: the unedited half is the source branch's
    assert diff[..., 4:].mean() > 0.1 * source.abs().mean()


def test_bad_edit_inputs_are_refused():
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim")
    cases = [({}, "mask", "no edit region"),
             ({"clip": clip(), "source_text": SOURCE_TEXT, "target_text": TARGET_TEXT, "words": "horse"}, "words",
              "horse not found"),
             ({"clip": clip(), "source_text": SOURCE_TEXT, "target_text": SOURCE_TEXT}, "words", "same words"),
             ({"mask": torch.ones(1, 64, 32)}, "mask", "resize the mask"),
             ({"mask": torch.ones(3, 64, 64)}, "mask", "batch of 3"),
             ({"mask": full_mask(1), "thresold": 0.5}, "thresold", "is not an input of this node"),
             ({"mask": full_mask(1), "inverted": {"samples": inv["samples"]}}, "inverted", "carries no inversion"),
             # NaN passes the host's range check; before, it emptied the region and the edit did nothing.
             ({"mask": full_mask(1), "threshold": float("nan")}, "threshold", "from 0 to 1"),
             ({"mask": full_mask(1), "softness": 1.5}, "softness", "from 0 to 1"),
             ({"mask": full_mask(1), "dilation": -1}, "dilation", ">= 0"),
             ({"mask": torch.ones(1, 0, 0)}, "mask", "not empty"),
             # Words with no CLIP to find them were dropped without a word.
             ({"mask": full_mask(1), "words": "dog"}, "words", "needs the clip input"),
             ({"mask": full_mask(1), "target_text": TARGET_TEXT}, "target_text", "needs the clip input")]
    for change, what, words in cases:
        with pytest.raises(NodeInputError) as e:
            blended(model, inv, prompt(1), prompt(2), **change)
        assert f"BlendedGuidanceSampler: input '{what}'" in str(e.value) and words in str(e.value), str(e.value)


# --- StochasticEditSampler ----------------------------------------------------------------------

def stochastic(model, inv, source, target, **kw):
    args = dict(model=model, inverted=inv, source=source, target=target, cfg=-1.0, eta=1.0, seed=7, count=3)
    args.update(kw)
    return StochasticEditSampler.execute(**args).result


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", ["ddim", "bdia", "aidi_anderson"])
def test_replay_with_the_source_prompt_reproduces_the_source(method, eta):
    model = exact_model("eps", MIX)
    inv = inverted(model, method, steps=8)
    edits, best, scores, _ = stochastic(model, inv, prompt(1), prompt(1), eta=eta, mask=full_mask(0),
                                        mask_mode="replace")
    src = inv["inversion"]["source"]
    for j in range(3):
        assert rel(edits["samples"][j:j + 1], src) <= 1e-4
    assert rel(best["samples"], src) <= 1e-4 and "dB" in scores


def test_seeds_vary_inside_the_mask_only():
    model = exact_model("flow", MIX)
    inv = Invert.execute(model=model, latent={"samples": vae_scale(model, MIX.sample(1, seed=4).float())},
                         positive=prompt(1), method="aidi_anderson", steps=8, scheduler="simple", cfg=1.0,
                         denoise=1.0, keep_trajectory=True).result[0]
    half = torch.zeros(1, 64, 64)
    half[:, :, 32:] = 1
    edits, best, scores, mask = stochastic(model, inv, prompt(1), prompt(2), cfg=3.0, mask=half, count=4)
    x = edits["samples"]
    inside = (x[:, :, :, 4:] - x[:1, :, :, 4:]).abs().flatten(1).mean(1)
    assert (inside[1:] > 0.05 * x.abs().mean()).all()
    # Outside the mask every seed gives the same latent: the source's prediction and mean are
    # used there (before: seeds moved it through the exact denoiser's coupling of all pixels).
    assert torch.equal(x[1:, :, :, :4], x[:1, :, :, :4].expand(3, -1, -1, -1))
    lines = scores.splitlines()
    assert len(lines) == 4
    best_j = max(range(4), key=lambda j: float(lines[j].split(": ")[1].split()[0]))
    assert torch.equal(best["samples"], x[best_j:best_j + 1])


def test_same_seed_same_edits_and_count_one_is_the_first():
    model = exact_model("eps", MIX)
    inv = inverted(model, "bdia", steps=6)
    half = torch.zeros(1, 64, 64)
    half[:, 16:48, 16:48] = 1
    a = stochastic(model, inv, prompt(1), prompt(2), mask=half, count=3)[0]["samples"]
    b = stochastic(model, inv, prompt(1), prompt(2), mask=half, count=3)[0]["samples"]
    one = stochastic(model, inv, prompt(1), prompt(2), mask=half, count=1)[0]["samples"]
    other = stochastic(model, inv, prompt(1), prompt(2), mask=half, count=1, seed=8)[0]["samples"]
    assert torch.equal(a, b)
    assert torch.allclose(one, a[:1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(other, a[1:2], rtol=1e-5, atol=1e-6)  # edit k uses seed + k
    assert not torch.allclose(a[0], a[1])


def test_seeds_past_the_hosts_largest_go_on_from_zero():
    """Seed 2^64 - 1 with count 2: the second edit uses seed 0, as the text says (before, seed + 1
    overflowed the generator after the model had been called)."""
    model = exact_model("eps", MIX)
    inv = inverted(model, "bdia", steps=6)
    top = (1 << 64) - 1
    edits, _, text, _ = stochastic(model, inv, prompt(1), prompt(2), mask=full_mask(1), count=2, seed=top)
    zero = stochastic(model, inv, prompt(1), prompt(2), mask=full_mask(1), count=1, seed=0)[0]["samples"]
    assert torch.allclose(edits["samples"][1:2], zero, rtol=1e-5, atol=1e-6)
    assert f"edit 0 (seed {top})" in text and "edit 1 (seed 0)" in text


def test_bad_stochastic_inputs_are_refused():
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim")
    no_traj = Invert.execute(model=model, latent={"samples": inv["inversion"]["source"]}, positive=prompt(1),
                             method="ddim", steps=4, scheduler="karras", cfg=1.0, denoise=1.0,
                             keep_trajectory=False).result[0]
    cases = [({"inverted": no_traj}, "inverted", "no trajectory"), ({"eta": 1.5}, "eta", "[0, 1]"),
             ({"count": 0}, "count", "at least 1"), ({"mask": None}, "mask", "no edit region")]
    for change, what, words in cases:
        with pytest.raises(NodeInputError) as e:
            stochastic(model, inv, prompt(1), prompt(2), **dict({"mask": full_mask(1)}, **change))
        assert f"StochasticEditSampler: input '{what}'" in str(e.value) and words in str(e.value), str(e.value)


# --- keeping the rest, DirectInversion, bad input -----------------------------------------------

def half_mask(size=64):
    m = torch.zeros(1, size, size)
    m[:, :, size // 2:] = 1
    return m


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_stochastic_keeps_the_rest_with_another_target(kind):
    """Before: the half outside a MASK changed by 1.2 relative with target = source and by 2.06
    with another target. Now the outside is the source's; measured: 0 relative change, bit for
    bit in model space, within float32 rounding of the VAE scaling (bound 1e-6)."""
    model = exact_model(kind, MIX)
    inv = inverted(model, "aidi_anderson", steps=8, scheduler="simple" if kind == "flow" else "karras")
    src = inv["inversion"]["source"]
    for target in (prompt(1), prompt(2)):
        edits, best, scores, _ = stochastic(model, inv, prompt(1), target, cfg=5.0, mask=half_mask(), count=3)
        x = edits["samples"]
        assert rel(x[..., :4], src.expand_as(x)[..., :4]) <= 1e-6
    inside = (x[1:, ..., 4:] - x[:1, ..., 4:]).abs().mean()
    assert inside > 0.05 * src.abs().mean()  # the seeds still vary the inside


@pytest.mark.parametrize("method", ["ddim", "naive_unsample", "easyinv"])
def test_direct_inversion_returns_the_source_where_plain_sampling_drifts(method):
    model = exact_model("eps", MIX)
    inv = inverted(model, method, steps=6)
    src = inv["inversion"]["source"]
    out, _ = blended(model, inv, prompt(1), prompt(1), cfg_edit=1.0, mask=full_mask(1), direct=True)
    assert rel(out["samples"], src) <= 1e-6
    assert rel(reconstruct(model, inv, prompt(1), -1.0), src) > 1e-3
    edited, _ = blended(model, inv, prompt(1), prompt(2), mask=half_mask(), direct=True)
    assert rel(edited["samples"][..., :4], src[..., :4]) <= 1e-6
    assert (edited["samples"][..., 4:] - src[..., 4:]).abs().mean() > 0.1 * src.abs().mean()


def test_direct_inversion_is_refused_where_it_does_not_apply():
    model = exact_model("eps", MIX)
    for method in ("bdia", "edict"):
        with pytest.raises(NodeInputError, match="input 'direct': DirectInversion applies to single-state"):
            blended(model, inverted(model, method), prompt(1), prompt(2), mask=half_mask(), direct=True)
    no_traj = Invert.execute(model=model, latent={"samples": vae_scale(model, MIX.sample(1, seed=4).float())},
                             positive=prompt(1), method="ddim", steps=4, scheduler="karras", cfg=1.0, denoise=1.0,
                             keep_trajectory=False).result[0]
    with pytest.raises(NodeInputError, match="keep_trajectory"):
        blended(model, no_traj, prompt(1), prompt(2), mask=half_mask(), direct=True)


def test_negative_cfg_other_than_minus_one_and_masks_outside_0_1_are_refused():
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim")
    calls = []
    model.set_model_unet_function_wrapper(lambda f, a, w=model.model_options["model_function_wrapper"]:
                                          calls.append(1) or w(f, a))
    cases = [(blended, {"cfg_inversion": -0.5, "mask": half_mask()}, "cfg_inversion", "expected -1 (the inversion's cfg"),
             (stochastic, {"cfg": -0.2, "mask": half_mask()}, "cfg", "expected -1 (the inversion's cfg"),
             # Past the guidance inputs' top (the API skips the widgets' range): refused, as a new inversion's is.
             (blended, {"cfg_inversion": 150.0, "mask": half_mask()}, "cfg_inversion", "or a value from 0 to 100"),
             (blended, {"mask": full_mask(1.5)}, "mask", "[0, 1]"),
             (stochastic, {"mask": full_mask(-0.1)}, "mask", "[0, 1]")]
    for run, change, what, words in cases:
        node = "BlendedGuidanceSampler" if run is blended else "StochasticEditSampler"
        with pytest.raises(NodeInputError) as e:
            run(model, inv, prompt(1), prompt(2), **change)
        assert f"{node}: input '{what}'" in str(e.value) and words in str(e.value), str(e.value)
    assert calls == []  # refused before any model call


def test_solver_errors_are_reported_once_and_not_as_bad_input():
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim", steps=4)
    inner = model.model_options["model_function_wrapper"]
    model.set_model_unet_function_wrapper(lambda f, a: inner(f, a) * float("nan"))
    for run, node in ((stochastic, "StochasticEditSampler"), (blended, "BlendedGuidanceSampler")):
        with pytest.raises(Exception) as e:
            run(model, inv, prompt(1), prompt(2), mask=half_mask())
        assert not isinstance(e.value, NodeInputError)
        assert str(e.value).startswith(f"{node}: ") and str(e.value).count(node) == 1, str(e.value)
        assert "non-finite" in str(e.value)


# --- video: Wan 2.1 on its real model class --------------------------------------------------------


# Two blocks of a wider transformer than the family test's: the attention test reads both.
WAN = dict(dim=64, ffn_dim=128, num_layers=2)
VIDEO = Mixture((16, 3, 8, 8), components=3, seed=2)


def tiny_wan(seed=0):
    return comfy_host.tiny_wan(seed, 0.2, **WAN)


def exact_wan(mixture=VIDEO):
    """Tiny Wan whose network is the exact mixture denoiser on (B, 16, T, H, W) (prompt k: component k)."""
    return comfy_host.with_mixture(tiny_wan(), mixture, "flow")


def wan_prompt(label):
    return [[torch.full((1, 16, comfy_host.CONTEXT), float(label + 1)), {}]]


def invert_video(model, method="bdia", positive=None, steps=6):
    latent = {"samples": vae_scale(model, VIDEO.sample(1, seed=4).float())}
    return run_invert(model, latent, positive or wan_prompt(1), method, steps, "simple")


def test_temporal_compression_is_the_hosts():
    assert host_model.temporal_factor(tiny_wan()) == 4
    assert host_model.temporal_factor(tiny_model("eps")) == 1


@pytest.mark.parametrize("method", ["bdia", "aidi_anderson"])
def test_video_mask_frames_edit_their_latent_frames_only(method):
    """9 frames -> 3 latent frames (1 + 2 x 4): white frames 5-8 are latent frame 2 only."""
    model = exact_wan()
    inv = invert_video(model, method)
    source = Reconstruct.execute(model=model, inverted=inv, positive=wan_prompt(1), cfg=-1.0).result[0]["samples"]
    frames = torch.zeros(9, 64, 64)
    frames[5:] = 1
    out, mask = blended(model, inv, wan_prompt(1), wan_prompt(2), mask=frames, mask_mode="replace")
    x = out["samples"]
    assert x.shape == source.shape and x.ndim == 5
    assert torch.equal(x[:, :, :2], source[:, :, :2])
    assert (x[:, :, 2] - source[:, :, 2]).abs().mean() > 0.1 * source.abs().mean()
    assert torch.equal(mask, frames)
    one = half_mask()  # a one-frame MASK applies to every frame
    out, mask = blended(model, inv, wan_prompt(1), wan_prompt(2), mask=one, mask_mode="replace")
    assert torch.equal(out["samples"][..., :4], source[..., :4])
    assert ((out["samples"][..., 4:] - source[..., 4:]).abs().mean((0, 1, 3, 4)) > 0.05).all()
    assert mask.shape == (9, 64, 64)


def test_video_stochastic_keeps_the_rest_and_direct_returns_the_source():
    model = exact_wan()
    inv = invert_video(model, "ddim")
    src = inv["inversion"]["source"]
    edits, _, _, _ = stochastic(model, inv, wan_prompt(1), wan_prompt(2), cfg=5.0, mask=half_mask(), count=2)
    assert edits["samples"].shape == (2, *src.shape[1:])
    assert rel(edits["samples"][..., :4], src.expand(2, -1, -1, -1, -1)[..., :4]) <= 1e-6
    out, _ = blended(model, inv, wan_prompt(1), wan_prompt(1), cfg_edit=1.0, mask=full_mask(1), direct=True)
    assert rel(out["samples"], src) <= 1e-6


def test_bad_video_masks_are_refused():
    model = exact_wan()
    inv = invert_video(model, "ddim", steps=3)
    with pytest.raises(NodeInputError, match="input 'mask': the mask has 5 frames"):
        blended(model, inv, wan_prompt(1), wan_prompt(2), mask=torch.ones(5, 64, 64))


def test_wan_attention_region_is_per_latent_frame(monkeypatch):
    """The edited word's cross attention on Wan's T x H x W token grid, frame by frame, against the
    direct softmax. The tokens are found with the host's T5 tokenizer (Wan's own UMT5 tokenizer
    file is not shipped with the host checkout)."""
    threshold = 0.97
    model = tiny_wan()
    g = torch.Generator().manual_seed(1)
    src = [[torch.randn(1, 16, comfy_host.CONTEXT, generator=g), {}]]
    tgt = [[torch.randn(1, 16, comfy_host.CONTEXT, generator=g), {}]]
    latent = {"samples": torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
    seen, mask = word_attention(monkeypatch, model, latent, src, tgt, threshold)
    maps = {"source": [], "target": []}
    for branch, q, k, kwargs in seen:
        if branch is None or k.shape[1] != 16:  # cross attention on the 16 context tokens only
            continue
        heads = kwargs["heads"]
        qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        p = (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1)
        m = p[..., [6]].sum(-1).mean(1).view(-1, 1, 3, 4, 4)  # T5: "cat" / "dog" at 6
        m = F.interpolate(F.max_pool3d(m, (1, 3, 3), 1, (0, 1, 1)), size=(3, 8, 8), mode="trilinear",
                          align_corners=False)
        maps[branch].append(m)
    assert len(maps["source"]) == len(maps["target"]) == 2 * 3  # 2 blocks x 3 sampled steps
    raw = torch.stack(maps["source"]).mean(0) + torch.stack(maps["target"]).mean(0)
    expect = (raw / raw.max() > threshold).float()[0, 0]
    got = F.avg_pool2d(mask[[0, 1, 5]][:, None], 8)[:, 0]  # the first frame of each latent frame
    assert torch.equal(got, expect)
    assert 0 < expect.mean() < 1
    assert not torch.equal(expect[0], expect[1]) or not torch.equal(expect[1], expect[2])  # regions per frame


# --- the user's attention backend ----------------------------------------------------------------

def set_backend(model, fn):
    """The user's attention backend through the host's own API (0.32+), else its override key."""
    m = model.clone()
    if hasattr(m, "set_model_optimized_attention"):
        m.set_model_optimized_attention(fn)
    else:
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
            lambda func, *args, **kwargs: fn(*args, **kwargs)
    return m


@pytest.mark.parametrize("family", ["flux", "unet"])
def test_the_users_attention_backend_runs_as_often_with_the_capture(family):
    """Issue 14: the capture replaced the override, and the backend ran 0 times instead of 2 per
    forward pass; attn2 got no transformer options. Now both chain to the user's choice."""
    import comfy.ldm.modules.attention as attention
    calls = []

    def backend(*args, **kwargs):
        calls.append(1)
        return attention.attention_basic(*args, **kwargs)

    if family == "flux":
        base = tiny_flux()
        latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))}
        src, tgt, tok, sched = flux_prompt(1), flux_prompt(2), comfy.text_encoders.flux.FluxTokenizer, "simple"
    else:
        base = tiny_model("eps")
        latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
        src, tgt, tok, sched = random_prompt(1), random_prompt(2), comfy.sd1_clip.SD1Tokenizer, "karras"
    inv = Invert.execute(model=base, latent=latent, positive=src, method="bdia", steps=3, scheduler=sched, cfg=1.0,
                         denoise=1.0, keep_trajectory=False).result[0]
    model = set_backend(base, backend)
    blended(model, inv, src, tgt, mask=full_mask(1), mask_mode="replace", cfg_edit=1.0)
    without = len(calls)
    calls.clear()
    blended(model, inv, src, tgt, clip=clip(tok), source_text=SOURCE_TEXT, target_text=TARGET_TEXT, cfg_edit=1.0)
    assert without > 0 and len(calls) == without


# --- soft regions through the nodes ------------------------------------------------------------------

RAMP = [0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1]  # a half region feathered over 2 latent pixels, per latent column


def columns(mask):
    """The MASK a node returned, one value per latent column (its first latent row)."""
    return F.avg_pool2d(mask[:, None], 8)[0, 0, 0]


@pytest.mark.parametrize("grow", [False, True])
def test_feathered_region_keeps_the_rest_and_shows_its_ramp(grow):
    """Blended guidance and the stochastic editor with a half MASK feathered over 2 latent pixels:
    the unedited half is the source branch (blended) or the trajectory's source (stochastic) bit for
    bit, the other changes, and the MASK they return is the feathered one."""
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim", steps=6, keep_trajectory=True)
    out, mask = blended(model, inv, prompt(1), prompt(2), mask=half_mask(), feather=2, grow=grow)
    source = reconstruct(model, inv, prompt(1), -1.0)
    assert torch.equal(out["samples"][..., :4], source[..., :4])
    assert rel(out["samples"][..., 4:], source[..., 4:]) > 1e-2
    assert torch.allclose(columns(mask), torch.tensor(RAMP), atol=1e-6, rtol=0)
    edits, _, _, mask = stochastic(model, inv, prompt(1), prompt(2), mask=half_mask(), feather=2, grow=grow, count=2)
    hard, _, _, _ = stochastic(model, inv, prompt(1), prompt(2), mask=half_mask(), count=2)
    assert torch.equal(edits["samples"][..., :4], hard["samples"][..., :4])  # the source's, as a hard mask keeps it
    assert rel(edits["samples"][..., 4:], inv["inversion"]["source"].expand(2, -1, -1, -1)[..., 4:]) > 1e-2
    assert torch.allclose(columns(mask), torch.tensor(RAMP), atol=1e-6, rtol=0)


def test_growing_region_edits_a_pixel_from_the_step_its_value_reaches():
    """A MASK of three columns: 1 (edited from the first step), 0.5 (from the middle step on) and
    0.1 (below the last step's threshold of 1/6: never). Growing, the 0.1 column stays the source
    branch bit for bit and the 0.5 column changes less than the 1 column; not growing, each column
    is edited at its value from the first step."""
    model = exact_model("eps", MIX)
    inv = inverted(model, "ddim", steps=6)
    m = torch.zeros(1, 64, 64)
    for col, v in ((5, 1.0), (6, 0.5), (7, 0.1)):
        m[:, :, 8 * col:8 * col + 8] = v
    source = reconstruct(model, inv, prompt(1), -1.0)
    out, _ = blended(model, inv, prompt(1), prompt(2), mask=m, mask_mode="replace", grow=True)
    change = (out["samples"] - source).abs().mean((0, 1, 2))
    assert torch.equal(out["samples"][..., 7], source[..., 7]) and change[:5].max() == 0
    assert change[5] > change[6] > 0
    out, _ = blended(model, inv, prompt(1), prompt(2), mask=m, mask_mode="replace")
    assert (out["samples"][..., 7] - source[..., 7]).abs().max() > 0


@pytest.mark.parametrize("editor", ["flowedit", "rf_inversion"])
def test_latent_editors_take_a_feathered_growing_region(editor):
    from inversion_suite.nodes.flowedit import FlowEdit
    from inversion_suite.nodes.rf_inversion import RFInversionEdit
    node, own = {"flowedit": (FlowEdit, dict(n_max=5, n_min=1, n_avg=1, noise="antithetic", composite="every step")),
                 "rf_inversion": (RFInversionEdit, dict(gamma=0.5, eta=0.9, start_step=0, stop_step=3))}[editor]
    model = tiny_model("eps")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.18
    edited, mask = node.execute(model=model, latent={"samples": x}, source=prompt(1), target=prompt(2), steps=6,
                                scheduler="karras", cfg_source=1.5, cfg_target=4.0, seed=1, mask=half_mask(),
                                feather=2, grow=True, **own).result
    y = edited["samples"]
    assert rel(y[..., :4], x[..., :4]) < 1e-6 and rel(y[..., 4:], x[..., 4:]) > 1e-3  # the latent format's rounding
    assert torch.allclose(columns(mask), torch.tensor(RAMP), atol=1e-6, rtol=0)
    with pytest.raises(NodeInputError, match="input 'feather'"):
        node.execute(model=model, latent={"samples": x}, source=prompt(1), target=prompt(2), steps=6,
                     scheduler="karras", cfg_source=1.5, cfg_target=4.0, seed=1, mask=half_mask(), feather=-1, **own)


def test_flowedit_refuses_an_unknown_noise_before_any_model_call():
    from inversion_suite.nodes.flowedit import FlowEdit
    model = tiny_model("eps")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.18
    with pytest.raises(NodeInputError, match="FlowEdit.*input 'noise'.*antithetic, independent"):
        FlowEdit.execute(model=model, latent={"samples": x}, source=prompt(1), target=prompt(2), steps=6,
                         scheduler="karras", n_max=5, n_min=0, n_avg=1, noise="pairs", composite="at the end", cfg_source=1.0,
                         cfg_target=4.0, seed=1)


def test_the_benchmarks_pack_flowedit_row_runs_the_nodes_defaults():
    """The edit benchmark's 'flowedit antithetic' row is the FlowEdit node at its defaults: its noise,
    composite and feather defaults map onto what the benchmark hands the solver."""
    from inversion_suite.benchmarks.editing import NODE_DEFAULTS
    from inversion_suite.nodes.flowedit import COMPOSITE, NOISE, FlowEdit
    defaults = {i.id: getattr(i, "default", None) for i in FlowEdit.define_schema().inputs}
    assert (defaults["noise"] == NOISE[0]) == NODE_DEFAULTS["antithetic"]
    assert (defaults["composite"] == COMPOSITE[0]) == NODE_DEFAULTS["paste"]
    assert defaults["feather"] == NODE_DEFAULTS["feather"]


@pytest.mark.parametrize("editor", ["flowedit", "rf_inversion", "invert"])
def test_an_inverted_latent_is_refused_where_the_image_is_expected(editor):
    """FlowEdit, RF-Inversion and Invert start from the image: an Invert output (noise, with its record)
    is refused before any model call, naming the node and the input."""
    from inversion_suite.nodes.flowedit import FlowEdit
    from inversion_suite.nodes.rf_inversion import RFInversionEdit
    model = tiny_model("eps")
    noise = inverted(model, method="ddim")
    common = dict(model=model, latent=noise, scheduler="karras", seed=1)
    call = {"flowedit": lambda: FlowEdit.execute(**common, source=prompt(1), target=prompt(2), steps=6, n_max=5,
                                                 n_min=0, n_avg=1, noise="antithetic", composite="at the end",
                                                 cfg_source=1.0, cfg_target=4.0),
            "rf_inversion": lambda: RFInversionEdit.execute(**common, source=prompt(1), target=prompt(2), steps=6,
                                                            gamma=0.5, eta=0.9, start_step=0, stop_step=3,
                                                            cfg_source=1.0, cfg_target=4.0),
            "invert": lambda: Invert.execute(model=model, latent=noise, positive=prompt(1), method="ddim", steps=6,
                                             scheduler="karras", cfg=1.0, denoise=1.0, keep_trajectory=False)}[editor]
    name = {"flowedit": "FlowEdit", "rf_inversion": "RFInversionEdit", "invert": "Invert"}[editor]
    with pytest.raises(NodeInputError, match=f"{name}.*input 'latent': expected the image's latent"):
        call()
