"""The bundled TinyUNet weights and the reconstruction benchmark built on them."""

import json

import pytest
import torch

from inversion_suite.benchmarks import data, reconstruction as rb
from inversion_suite.benchmarks.tinyunet import VARIANTS, load, path, read
from inversion_suite.solvers import METHODS, SAMPLERS, invert, reconstruct


@pytest.fixture(scope="module")
def patches():
    return data.held_out(16)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return load(request.param)


def noised(x0, level, variant, seed=0):
    """The state at a noise level and what the identity (a rescaled x) would estimate x0 as."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    if variant == "eps":
        x = x0 + level * eps
        return x, x
    x = (1 - level) * x0 + level * eps
    return x, x / (1 - level)


def mse(a, b):
    return float((a - b).pow(2).mean())


def test_weights_carry_their_recipe():
    for v in VARIANTS:
        net, meta = read(path(v))
        assert meta["variant"] == v
        assert meta["command"].startswith("python benchmarks/train.py")
        assert {"seed", "steps", "batch", "config", "torch"} <= set(meta)
        assert 1e5 < sum(p.numel() for p in net.parameters()) < 5e6


# Mid noise: EPS sigma 0.5 (SNR 1 for pixels of std ~0.5), flow s = 0.5 (the midpoint).
# Measured on 16 held-out patches: EPS about 0.06, flow about 0.03 (benchmarks/weights/README.md).
@pytest.mark.parametrize("label", ["cond", "uncond"])
def test_denoises_better_than_identity(model, patches, label):
    x0, labels = patches
    x, ident = noised(x0, 0.5, model.variant)
    sigma = torch.full((len(x0),), 0.5)
    out = model(x, sigma, labels if label == "cond" else None, 1.0)
    ratio = mse(out, x0) / mse(ident, x0)
    assert ratio < 0.1, f"{model.variant}/{label}: denoised MSE is {ratio:.3f} of the identity's"


def test_label_helps_and_guidance_acts(model, patches):
    # The label names the source photo, so the conditional denoiser beats the
    # unconditional one; a 16 px patch's own pixels already reveal much of it, so the gain
    # is small (EPS sigma 2: about 2%, flow s 0.75: about 7%). Guidance at w = 3 must move
    # the estimate by a good fraction of its error, or cfg 3 would test nothing.
    x0, labels = patches
    level = 0.75 if model.variant == "flow" else 2.0
    x, _ = noised(x0, level, model.variant, seed=1)
    s = torch.full((len(x0),), level)
    d1, du, d3 = model(x, s, labels, 1.0), model(x, s, None), model(x, s, labels, 3.0)
    assert mse(d1, x0) < 0.995 * mse(du, x0), f"{model.variant}: conditional {mse(d1, x0):.4f} vs {mse(du, x0):.4f}"
    assert mse(d3, d1) > 0.1 * mse(d1, x0)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_bdia_round_trips_the_trained_model(model, patches, cfg):
    # Exact up to float rounding, at 10 steps and the default gamma 0.94. Flow states stay
    # near the image's scale: 1e-5 of ||x|| holds with room (measured 1e-6 / 3e-6 at cfg
    # 1 / 3). An EPS latent at sigma 14.6 is about 28 times ||x||, so float32 rounding of
    # the state alone is ~2e-6 of ||x|| there and the round trip lands at 1.5e-5 / 6e-5:
    # bounded relative to the largest state instead, and in float64 (where only the
    # network's float32 rounding is left) relative to ||x||.
    x, labels = patches[0][:4], patches[1][:4]
    extra = {"label": labels, "cfg": cfg}
    sig = rb.schedule(model.variant, 10)
    inv = invert("bdia", model, x, sig, extra, space=model.variant)
    err = float((reconstruct(model, inv, extra) - x).norm())
    if model.variant == "flow":
        assert err <= 1e-5 * float(x.norm()), f"flow cfg {cfg}: BDIA round trip off by {err / x.norm():.2e}"
        return
    assert err <= 1e-5 * float(inv.latent.norm()), f"eps cfg {cfg}: off by {err / inv.latent.norm():.2e} of ||x_N||"
    x64 = x.double()
    inv = invert("bdia", model, x64, sig, extra, space="eps")
    rel = float((reconstruct(model, inv, extra) - x64).norm() / x64.norm())
    assert rel <= 1e-6, f"eps cfg {cfg}, float64: BDIA round trip off by {rel:.2e}"


def test_benchmark_library_on_a_tiny_config(tmp_path):
    steps = 3
    rows, recs, orig = rb.benchmark(spaces=("eps", "flow"), steps=(steps,), cfgs=(1.0, 2.0), batch=2,
                                    progress=False)
    mix = rb.mixture_study(batch=2, n=4, caps=(5,))
    rb.write(rows, recs, orig, tmp_path, mix, {"command": "test", "seconds": 0.0, "batch": 2})
    for f in ("results.md", "results.json", "psnr_vs_nfe.png", "grid.png"):
        assert (tmp_path / f).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    names = {c.name for c in rb.cases()}
    assert set(METHODS) <= names and {r["case"] for r in rows} == names
    assert len(rows) == 2 * 2 * len(names)
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    # Every row's NFE is the Inversion's own count, and the fixed costs are what the methods promise.
    x, labels = orig
    fixed = {"ddim": steps, "naive_unsample": steps, "easyinv": steps, "bdia": steps, "edict": 2 * steps,
             "renoise": METHODS["renoise"].defaults()["iterations"] * steps, "rf_solver": 2 * steps,
             "fireflow": steps + 1}
    for r in rows:
        case = next(c for c in rb.cases() if c.name == r["case"])
        inv = invert(case.method, rb.load(r["space"]), x, rb.schedule(r["space"], steps),
                     {"label": labels, "cfg": r["cfg"]}, space=r["space"], **case.settings)
        assert r["nfe"] == inv.nfe
        assert r["nfe"] == fixed.get(r["method"], r["nfe"])
        assert steps <= r["nfe"] <= steps * r["settings"].get("iterations", 2)
        # BDIA resumes from the stored pair, so its first sampling step needs no call; the
        # implicit methods sample back down their schedule, split steps included.
        assert r["nfe_rec"] == SAMPLERS[inv.sampler].calls(inv.steps)
        assert 0 <= r["outside"] < 1 and r["vs_ddim"] > 0
    assert {(m["space"], m["cfg"], m["method"]) for m in mix} == {
        (s, w, m) for s in ("eps", "flow") for w in (1.0, 3.0) for m in ("fixed_point", "aidi_anderson")}

