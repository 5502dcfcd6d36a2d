"""solvers.metrics against scikit-image on its own test images (no ComfyUI needed)."""

import numpy as np
import pytest
import torch

from inversion_suite.solvers import metrics

skimage = pytest.importorskip("skimage")
from skimage import data, filters, util  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-3
# The gap to scikit-image measured on these images is below 1e-12 (float64 both sides).
WORST = {"psnr": 0.0, "ssim": 0.0}


def sk_ssim(ref, test, span):
    """scikit-image's SSIM as the node documents it; images are (H, W) or (H, W, C)."""
    return structural_similarity(ref, test, data_range=span, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=2 if ref.ndim == 3 else None)


def as_torch(*images):
    """(H, W[, C]) numpy images as one (B, C, H, W) batch."""
    return torch.stack([torch.from_numpy(np.atleast_3d(im)).permute(2, 0, 1) for im in images])


def degraded(image, seed):
    """The image with noise, a blur, or both: the kind of error a reconstruction leaves."""
    rng = np.random.default_rng(seed)
    axis = 2 if image.ndim == 3 else None
    out = [np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1),
           filters.gaussian(image, sigma=1.2, channel_axis=axis),
           np.clip(filters.gaussian(image, sigma=0.7, channel_axis=axis) + rng.normal(0, 0.01, image.shape), 0, 1)]
    return out


IMAGES = {"astronaut": data.astronaut, "camera": data.camera, "coffee": data.coffee}


@pytest.fixture(scope="module", params=list(IMAGES))
def case(request):
    image = util.img_as_float(IMAGES[request.param]())
    return request.param, image, degraded(image, seed=len(request.param))


def agree(name, ours, theirs):
    gap = abs(float(ours) - float(theirs))
    WORST[name] = max(WORST[name], gap)
    assert gap <= TOL, (name, float(ours), float(theirs))


def test_psnr_and_ssim_match_scikit_image_per_image(case):
    name, ref, tests = case
    for test in tests:
        a, b = as_torch(ref), as_torch(test)
        agree("psnr", metrics.psnr(a, b, 1.0)[0], peak_signal_noise_ratio(ref, test, data_range=1.0))
        agree("ssim", metrics.ssim(a, b, 1.0)[0], sk_ssim(ref, test, 1.0))
    print(f"{name}: worst gap to scikit-image so far: PSNR {WORST['psnr']:.1e} dB, SSIM {WORST['ssim']:.1e}")


def test_batched_values_are_the_per_item_values(case):
    _, ref, tests = case
    a, b = as_torch(*[ref] * len(tests)), as_torch(*tests)
    m = metrics.report(a, b, 1.0)
    for i, test in enumerate(tests):
        agree("psnr", m["psnr"][i], peak_signal_noise_ratio(ref, test, data_range=1.0))
        agree("ssim", m["ssim"][i], sk_ssim(ref, test, 1.0))
        err = np.linalg.norm(test - ref) / np.linalg.norm(ref)
        assert abs(float(m["rel_error"][i]) - err) <= 1e-12
    assert m["mean"]["ssim"] == pytest.approx(float(m["ssim"].mean()))
    assert m["mean"]["psnr"] == pytest.approx(float(m["psnr"].mean()))


def test_default_range_is_each_references_span():
    # Latent-like data: no fixed range, signed values, float32 input.
    ref = util.img_as_float(data.camera())[100:164, 200:264] * 8 - 3
    test = ref + np.random.default_rng(0).normal(0, 0.2, ref.shape)
    scaled, scaled_test = ref * 0.5, test * 0.5
    a, b = as_torch(ref, scaled).float(), as_torch(test, scaled_test).float()
    ours = metrics.report(a, b)
    for i, (r, t) in enumerate(((ref, test), (scaled, scaled_test))):
        r, t = r.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)
        span = r.max() - r.min()
        agree("psnr", ours["psnr"][i], peak_signal_noise_ratio(r, t, data_range=span))
        agree("ssim", ours["ssim"][i], sk_ssim(r, t, span))
    # PSNR and SSIM do not change when the data (and so its range) scale.
    assert ours["psnr"][0] == pytest.approx(float(ours["psnr"][1]), abs=1e-6)
    assert ours["ssim"][0] == pytest.approx(float(ours["ssim"][1]), abs=1e-6)


def test_window_sized_images_and_border_cases():
    image = util.img_as_float(data.coffee())[50:61, 70:83]  # 11 x 13: one row of window centres
    test = filters.gaussian(image, sigma=1.0, channel_axis=2)
    agree("ssim", metrics.ssim(as_torch(image), as_torch(test), 1.0)[0], sk_ssim(image, test, 1.0))
    x = as_torch(image)
    assert float(metrics.psnr(x, x, 1.0)[0]) == float("inf")
    assert float(metrics.ssim(x, x, 1.0)[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(metrics.rel_error(x, x)[0]) == 0.0
    # Smaller than the window (scikit-image refuses these): a finite mean over the whole map.
    tiny = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = metrics.ssim(tiny, tiny + 0.05)
    assert torch.isfinite(s).all() and (s < 1).all()
    assert torch.equal(metrics.data_range(torch.ones(1, 4, 8, 8)), torch.ones(1, dtype=torch.float64))


def test_video_frames_count_as_channels():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 4, 3, 16, 16, generator=g)
    b = a + 0.1 * torch.randn(a.shape, generator=g)
    frames = torch.stack([metrics.ssim(a[:, :, t], b[:, :, t], 1.0) for t in range(3)]).mean(0)
    assert torch.allclose(metrics.ssim(a, b, 1.0), frames, atol=1e-12)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))


# --- edit measures: structure inside the region, seam at its edge ---------------------------------

def test_structure_is_the_correlation_of_the_2x2_mean_luminance():
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(3, 3, 16, 8, generator=g, dtype=torch.float64) * 2 - 1
    test = torch.rand(3, 3, 16, 8, generator=g, dtype=torch.float64) * 2 - 1
    got = metrics.structure(ref, test)
    for i in range(3):  # restated in numpy: BT.601 luminance, 2x2 means, Pearson's r
        lum = [np.tensordot([0.299, 0.587, 0.114], t[i].numpy(), 1) for t in (ref, test)]
        a, b = [y.reshape(8, 2, 4, 2).mean((1, 3)).ravel() for y in lum]
        assert float(got[i]) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert torch.allclose(metrics.structure(ref, ref), torch.ones(3, dtype=torch.float64), atol=1e-12)
    # colour and contrast do not count, the layout does
    assert torch.allclose(metrics.structure(ref, 0.3 * ref - 0.2), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(metrics.structure(ref, -ref), -torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert float(metrics.structure(ref, torch.zeros_like(ref)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="RGB"):
        metrics.structure(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))


def test_seam_ratio_compares_the_step_across_the_edge_with_the_steps_beside_it():
    mask = torch.zeros(1, 1, 6, 8)
    mask[..., 4:] = 1
    cols = torch.arange(8, dtype=torch.float64)
    ramp = cols.expand(2, 3, 6, 8).clone()  # the same step (1) between every two columns
    assert torch.allclose(metrics.seam_ratio(ramp, mask), torch.ones(2, dtype=torch.float64))
    # rows change by 5 a step: a vertical edge reads column steps only, so the ratio stays 1
    rows = torch.arange(6, dtype=torch.float64).view(6, 1) * 5
    assert torch.allclose(metrics.seam_ratio(ramp + rows, mask), torch.ones(2, dtype=torch.float64))
    jump = ramp.clone()
    jump[..., 4:] += 3  # across the edge (columns 3|4) 4; beside it (2|3 and 4|5) 1
    jump[..., :2] *= 7  # far from the edge: not counted
    assert torch.allclose(metrics.seam_ratio(jump, mask), torch.full((2,), 4.0, dtype=torch.float64))
    steps = torch.tensor([0, 1, 3, 6, 8, 9, 9, 9], dtype=torch.float64)  # column steps 1 2 3 2 1 0 0
    assert float(metrics.seam_ratio(steps.expand(1, 3, 6, 8), mask)[0]) == pytest.approx(2 / ((3 + 1) / 2), abs=1e-12)
    # a square region: edge steps along both axes, each against the steps beside it on its own axis
    sq = torch.zeros(1, 1, 7, 8)
    sq[..., 2:4, 2:5] = 1
    rows7 = torch.arange(7, dtype=torch.float64).view(7, 1) * 5
    x = (cols * 2 + rows7).expand(1, 1, 7, 8).clone()  # column steps 2, row steps 5
    x[..., 2:4, 2:5] += 10
    # across: columns 1|2 and 4|5 in two rows (12, 8), rows 1|2 and 3|4 in three columns (15, 5);
    # beside: column steps 2 (and 2 inside), row steps 5 (0|1, 2|3 inside, 4|5)
    across = 2 * 12 + 2 * 8 + 3 * 15 + 3 * 5
    beside = 4 * 2 + 6 * 5  # each axis's mean step beside, times its count of edge steps
    assert float(metrics.seam_ratio(x, sq)[0]) == pytest.approx(across / beside, abs=1e-12)
    with pytest.raises(ValueError, match="no edge"):
        metrics.seam_ratio(ramp, torch.ones(1, 1, 6, 8))
    with pytest.raises(ValueError, match="mask"):
        metrics.seam_ratio(ramp, torch.ones(1, 6, 8))
