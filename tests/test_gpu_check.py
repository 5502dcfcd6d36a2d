"""The prepared GPU script (``benchmarks/gpu_check.py``, issue 24), run here on the CPU.

Its ``--tiny`` mode (the tiny host models of ``comfy_host``, 16x16 latents) through ``main``:
a row for every model x dtype x method asked, the exact methods exact, the known call
counts, the Markdown table; its time guard; the full-size configurations it builds on a GPU
(on the meta device: no memory); and its checkpoint mode on a tiny SD1.5-shaped checkpoint
written here, read back by the host's own loader.
"""

import json
import math

import comfy_host  # skips this module where no ComfyUI is found
import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_base
import comfy.supported_models
import comfy.taesd.taesd
from inversion_suite.benchmarks import gpu_check
from inversion_suite.solvers import METHODS

STEPS = 4
# Model calls per step of the inversion, from the methods' update rules (FireFlow: one per step
# and one to start its reused midpoint slope).
CALLS = {"ddim": 1, "naive_unsample": 1, "easyinv": 1, "bdia": 1, "edict": 2, "rf_solver": 2,
         "fireflow": (STEPS + 1) / STEPS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    return gpu_check.main(["--tiny", "--device", "cpu", "--dtypes", "fp32", "--steps", str(STEPS), "--limit", "600",
                           "--out", str(out)]), out


def test_tiny_mode_measures_every_method_model_and_dtype(tiny):
    result, out = tiny
    rows = result["rows"]
    want = {(f, "fp32", m) for f in gpu_check.FAMILIES for m in METHODS}
    assert sorted((r["model"], r["dtype"], r["method"]) for r in rows) == sorted(want)
    for r in rows:
        assert "rel" in r, r  # measured: neither skipped nor failed
        assert math.isfinite(r["rel"])
        assert r["nfe_rec"] == r["nfe_rec_expected"], r  # the registry's sampler calls, on the inversion's schedule
        assert 0 <= r["solver_share"] < 1
        assert r["shape"] == [1, 16 if r["model"] == "flux" else 4, 16, 16]
        if r["method"] in ("bdia", "edict"):
            assert r["rel"] < 1e-5, r
        if r["method"] in CALLS:
            assert r["calls_per_step"] == pytest.approx(CALLS[r["method"]], abs=1e-12), r
        if "loop" in METHODS[r["method"]].settings:  # the implicit loop: a hard budget of iterations x steps calls
            assert r["nfe"] <= METHODS[r["method"]].settings["iterations"].default * STEPS
    assert {r["model_class"] for r in rows} == {"BaseModel", "SDXL", "Flux"}
    saved = json.loads((out / "gpu_check.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["mode"] == "tiny"
    md = (out / "gpu_check.md").read_text()
    assert md == result["markdown"]
    for r in rows:
        assert f"| {r['model']} | fp32 | {r['method']} | {r['rel']:.1e} | {r['calls_per_step']:.1f} |" in md
    for m in ("bdia", "edict"):
        worst = max(r["rel"] for r in rows if r["method"] == m)
        assert f"- {m} in fp32: worst round trip {worst:.1e}" in md


def test_half_precision_keeps_the_exact_methods_near_exact(tmp_path):
    """bf16 network, float32 solver: BDIA and EDICT stay within 1e-3 (measured here: 1e-8 to 3e-4;
    a state that rounds differently to bf16 on the way back changes one network output)."""
    rows = gpu_check.main(["--tiny", "--device", "cpu", "--dtypes", "bf16", "--steps", str(STEPS), "--methods", "ddim",
                           "bdia", "edict", "--limit", "600", "--out", str(tmp_path)])["rows"]
    assert len(rows) == 9 and all(r["dtype"] == "bf16" and "rel" in r for r in rows)
    for r in rows:
        if r["method"] == "ddim":
            assert r["calls_per_step"] == 1
        else:
            assert r["rel"] < 1e-3, r


def test_time_guard(tmp_path):
    # No share left: every run asked for has a row saying why it was not run.
    rows = gpu_check.main(["--tiny", "--device", "cpu", "--limit", "0", "--methods", "ddim", "bdia",
                           "--out", str(tmp_path)])["rows"]
    assert len(rows) == 3 * 3 * 2 and all(r["skipped"].startswith("time") for r in rows)
    assert "| sd15 | fp16 | bdia |" in (tmp_path / "gpu_check.md").read_text()
    # A run reaching its deadline stops before the next model call.
    model = comfy_host.tiny_model("eps")
    samples = model.model.process_latent_out(torch.randn(1, 4, 8, 8))
    with pytest.raises(gpu_check.OutOfTime, match="after 0 model calls"):
        gpu_check.roundtrip(model, samples, gpu_check.conditioning(model.model.model_config), "ddim", STEPS, "normal",
                            1.0, torch.device("cpu"), deadline=0.0)
    # The exact methods are tried first, then the others by their most calls.
    first = gpu_check.order(list(METHODS), 10)
    assert first[:2] == ["bdia", "edict"] and first.index("ddim") < first.index("renoise") < first.index("aidi_anderson")


def test_full_size_models_are_the_published_ones():
    """What a GPU run builds: the host's configs detected from the published key layouts, at the
    published sizes (built on the meta device, so nothing is allocated)."""
    sizes = {"sd15": ("SD15", "BaseModel", 859_520_964), "sdxl": ("SDXL", "SDXL", 2_567_463_684),
             "flux": ("Flux", "Flux", 11_901_408_320)}
    for family, (config_name, model_name, params) in sizes.items():
        config = gpu_check.model_config(family)
        model = config.get_model({}, "", device=torch.device("meta"))
        assert (type(config).__name__, type(model).__name__) == (config_name, model_name)
        assert sum(p.numel() for p in model.diffusion_model.parameters()) == params
        assert model.latent_format.latent_channels == (16 if family == "flux" else 4)


def tiny_checkpoint(path):
    """A checkpoint the host's loader reads as SD1.5: its detection wants 320 model channels and a
    768-wide context, so the UNet keeps those with one level and no middle block (19 M weights);
    the VAE is a TAESD (the host's tiny autoencoder, 2.4 M weights), random."""
    import safetensors.torch
    unet = dict(gpu_check.model_config("sd15").unet_config, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                transformer_depth_output=[1, 1], transformer_depth_middle=-2, dtype=torch.float32)
    base = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet), device=torch.device("cpu"))
    gpu_check.randomise(base.diffusion_model, 1, *gpu_check.OUTPUT["sd15"])
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)  # comfy.ops leaves its weights uninitialised too
    gpu_check.randomise(vae.taesd_encoder, seed=2, out_gain=20.0)  # SD-sized latents: std ~6, ~1 in the model's space
    gpu_check.randomise(vae.taesd_decoder, seed=3, out_gain=1.0)
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in base.diffusion_model.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae.state_dict().items()})
    safetensors.torch.save_file(sd, str(path))


def test_checkpoint_mode_through_the_hosts_loader(tmp_path):
    ckpt, images = tmp_path / "tiny_sd15.safetensors", tmp_path / "images"
    tiny_checkpoint(ckpt)
    images.mkdir()
    yy, xx = np.mgrid[0:64, 0:80]
    for i in range(2):
        im = np.stack([np.sin(xx / (6 + i)), np.cos(yy / 9), np.sin((xx + yy) / (11 + 3 * i))], -1)
        Image.fromarray(((im + 1) * 127.5).astype(np.uint8)).save(images / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    result = gpu_check.main(["--checkpoint", str(ckpt), "--images", str(images), "--size", "64", "--steps", str(STEPS),
                             "--methods", "ddim", "bdia", "edict", "--device", "cpu", "--out", str(tmp_path / "out")])
    rows = result["rows"]
    assert [(r["image"], r["method"]) for r in rows] == [(f"im{i}.png", m) for i in range(2) for m in ("ddim", "bdia", "edict")]
    for r in rows:
        assert (r["config"], r["model_class"], r["shape"]) == ("SD15", "BaseModel", [1, 4, 8, 8])
        assert r["prompt"].startswith("none")  # no text encoder in the checkpoint: a zeroed prompt
        assert math.isfinite(r["psnr"]) and math.isfinite(r["vae_psnr"])
        if r["method"] == "ddim":
            assert r["calls_per_step"] == 1
        else:  # exact in the latent, so the decoded image is the VAE's own round trip
            assert r["rel"] < 1e-5
            assert r["psnr"] == pytest.approx(r["vae_psnr"], abs=1e-2)
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.count("| im0.png |") == 3 and "Checkpoint `tiny_sd15.safetensors`" in md
