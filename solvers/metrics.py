"""Reconstruction and edit quality in pure torch: relative error, PSNR and SSIM per batch item;
for edits, the structure kept inside a region and the seam at its edge.

Tensors are channel-first, ``(B, C, H, W)`` or ``(B, C, T, H, W)`` (frames count as extra
channels). Every function takes ``(reference, test)`` in scikit-image's order and returns
one value per batch item. Work is done in float64 (float32 on MPS, which has no float64)
so the numbers match ``skimage.metrics`` well below the reported digits.

``data_range`` is the span of values the data can take: 1 for images in [0, 1]. ``None``
takes each reference item's own ``max - min`` (for latents, whose range is not fixed);
a constant reference falls back to 1 so the ratio stays defined.
"""

from __future__ import annotations

import math

import torch

SIGMA = 1.5      # Wang et al. 2004, as skimage's structural_similarity(gaussian_weights=True)
TRUNCATE = 3.5   # skimage's truncation for that case: radius int(3.5 * 1.5 + 0.5) = 5, an 11x11 window
K1, K2 = 0.01, 0.03


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _pair(ref: torch.Tensor, test: torch.Tensor):
    if ref.shape != test.shape:
        raise ValueError(f"reference and test shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    if ref.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W) tensors, got shape {tuple(ref.shape)}")
    return _work(ref), _work(test).to(ref.device)


def data_range(ref: torch.Tensor) -> torch.Tensor:
    """Per item ``max - min`` of the reference; 1 where the reference is constant."""
    flat = _work(ref).flatten(1)
    span = flat.amax(1) - flat.amin(1)
    return torch.where(span > 0, span, torch.ones_like(span))


def _ranges(ref: torch.Tensor, value) -> torch.Tensor:
    if value is None:
        return data_range(ref)
    return torch.as_tensor(value, dtype=_work(ref).dtype, device=ref.device).expand(ref.shape[0])


def rel_error(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per item ``||test - ref|| / ||ref||`` (0 where both are zero, inf where only ref is)."""
    ref, test = _pair(ref, test)
    diff = (test - ref).flatten(1).norm(dim=1)
    norm = ref.flatten(1).norm(dim=1)
    return torch.where(diff == 0, torch.zeros_like(diff), diff / norm)


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range=None, floor: float = 0.0) -> torch.Tensor:
    """Per item ``10 log10(R^2 / max(mse, floor))`` in dB; with ``floor`` 0, inf for identical items
    (as scikit-image)."""
    r = _ranges(ref, data_range)
    ref, test = _pair(ref, test)
    mse = (test - ref).pow(2).flatten(1).mean(1).clamp_min(floor)
    return 10 * torch.log10(r * r / mse)


def gaussian_kernel(sigma: float = SIGMA, truncate: float = TRUNCATE, dtype=torch.float64, device=None):
    """scipy.ndimage's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def uniform_kernel(size: int, dtype=torch.float64, device=None):
    """scipy.ndimage's 1-D uniform filter of ``size`` taps (scikit-image's default SSIM window)."""
    return torch.full((size,), 1.0 / size, dtype=dtype, device=device)


def _symmetric(n: int, radius: int, device) -> torch.Tensor:
    # scipy's mode='reflect' repeats the edge sample (d c b a | a b c d | d c b a);
    # torch's "reflect" pad does not, so index the extension directly (works for any n).
    i = torch.arange(-radius, n + radius, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _correlate(p: torch.Tensor, kernel: list, dim: int, size: int) -> torch.Tensor:
    out = p.narrow(dim, 0, size) * kernel[0]
    for k in range(1, len(kernel)):
        out.add_(p.narrow(dim, k, size), alpha=kernel[k])  # in place: no temporary per tap
    return out


def separable_filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable filtering of ``(..., H, W)`` along W then H, scipy's 'reflect' borders."""
    # Shifted slices summed in place: several times faster than conv2d in float64 on CPU.
    taps, r = kernel.tolist(), kernel.numel() // 2
    h, w = x.shape[-2:]
    x = _correlate(x[..., _symmetric(w, r, x.device)], taps, -1, w)
    return _correlate(x[..., _symmetric(h, r, x.device), :], taps, -2, h)


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range=None, window: int = 0) -> torch.Tensor:
    """Per item mean SSIM, channels (and frames) averaged.

    With ``window`` 0, the Gaussian window: the same numbers as
    ``skimage.metrics.structural_similarity(ref, test, data_range=R, channel_axis=...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, population
    (co)variances. With ``window`` n > 0, scikit-image's default: an n x n uniform window and
    sample (co)variances (``win_size=n``). K1 = 0.01, K2 = 0.03, and the mean taken inside a
    border of the window's radius. Images smaller than the window (scikit-image refuses them)
    are averaged over the whole map instead.
    """
    r = _ranges(ref, data_range)
    ref, test = _pair(ref, test)
    b = ref.shape[0]
    ref, test = ref.flatten(1, -3), test.flatten(1, -3)  # (B, C*T, H, W)
    k = uniform_kernel(window, ref.dtype, ref.device) if window else gaussian_kernel(SIGMA, TRUNCATE, ref.dtype, ref.device)
    n = window * window
    cov = n / (n - 1) if window else 1.0  # scikit-image's sample covariance over the window's n pixels
    mu_x, mu_y, xx, yy, xy = separable_filter(torch.stack([ref, test, ref * ref, test * test, ref * test]), k)
    vx, vy, vxy = cov * (xx - mu_x * mu_x), cov * (yy - mu_y * mu_y), cov * (xy - mu_x * mu_y)
    c1 = (K1 * r).view(b, 1, 1, 1) ** 2
    c2 = (K2 * r).view(b, 1, 1, 1) ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * vxy + c2) / ((mu_x * mu_x + mu_y * mu_y + c1) * (vx + vy + c2))
    pad = k.numel() // 2
    if min(s.shape[-2:]) > 2 * pad:
        s = s[..., pad:-pad, pad:-pad]
    return s.flatten(2).mean(2).mean(1)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance of RGB


def structure(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per item layout kept: the correlation of the 2x2-mean luminance of ``test`` with ``ref``'s.

    ``(B, 3, H, W)`` RGB regions (H and W even). Each luminance map is centred and normalised,
    so colour and contrast (what a label edit must move) do not count: ``ref`` itself, or any
    ``a * ref + b`` with ``a > 0``, scores 1; unrelated patches near 0; a constant map 0.
    """
    ref, test = _pair(ref, test)
    if ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) RGB regions, got shape {tuple(ref.shape)}")
    w = torch.tensor(LUMA, dtype=ref.dtype, device=ref.device).view(1, 3, 1, 1)

    def layout(x):
        y = torch.nn.functional.avg_pool2d((x * w).sum(1, keepdim=True), 2).flatten(1)
        y = y - y.mean(1, keepdim=True)
        n = y.norm(dim=1, keepdim=True)
        return torch.where(n > 0, y / n.clamp_min(1e-300), torch.zeros_like(y))
    return (layout(ref) * layout(test)).sum(1)


def seam_ratio(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per item: the mean step across the region's edge over the mean step just beside it.

    ``x`` is ``(B, C, H, W)``; ``mask`` ``(B or 1, 1, H, W)``, the region where it is >= 0.5. A step
    is the channel-mean absolute difference of two neighbouring pixels along one axis; it is
    across the edge where one of them is in the region and the other not, and beside the edge
    where it is one pixel further along the same axis on either side (and not across it
    itself): for a vertical edge, the steps between the two columns next to it on each side.
    So the image's own texture at the edge scores about 1, and a visible seam more.
    """
    x = _work(x)
    if x.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:] or \
            mask.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"expected x (B, C, H, W) and a mask (B or 1, 1, H, W), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    m = (mask.to(x.device) >= 0.5).expand(x.shape[0], 1, *x.shape[2:])
    across, beside, count = 0, 0, 0  # per axis: the sum of the edge's steps, and its count times the mean step beside
    for d in (2, 3):
        n = x.shape[d] - 1
        step = (x.narrow(d, 1, n) - x.narrow(d, 0, n)).abs().mean(1, keepdim=True)
        cross = m.narrow(d, 1, n) != m.narrow(d, 0, n)
        near = torch.zeros_like(cross)
        near.narrow(d, 1, n - 1).logical_or_(cross.narrow(d, 0, n - 1))
        near.narrow(d, 0, n - 1).logical_or_(cross.narrow(d, 1, n - 1))
        near &= ~cross
        k = cross.flatten(1).sum(1)
        count = count + k
        across = across + (step * cross).flatten(1).sum(1)
        beside = beside + k * (step * near).flatten(1).sum(1) / near.flatten(1).sum(1).clamp_min(1)
    if (count == 0).any():
        raise ValueError("the mask has no edge inside the image: every pixel is in the region, or none is")
    return across / beside


def report(ref: torch.Tensor, test: torch.Tensor, data_range=None) -> dict:
    """All three per item, and their batch means (PSNR averaged in dB)."""
    out = {"rel_error": rel_error(ref, test), "psnr": psnr(ref, test, data_range),
           "ssim": ssim(ref, test, data_range)}
    out["mean"] = {name: float(v.mean()) for name, v in out.items()}
    return out


def table(metrics: dict, title: str = "") -> str:
    """A fixed-width text table of a ``report``: one row per item and the mean."""
    rows = [title] if title else []
    rows.append(f"{'item':>5}  {'rel. error':>10}  {'PSNR dB':>8}  {'SSIM':>7}")
    for i, (e, p, s) in enumerate(zip(metrics["rel_error"].tolist(), metrics["psnr"].tolist(),
                                      metrics["ssim"].tolist())):
        rows.append(f"{i:>5}  {e:>10.3e}  {_db(p)}  {s:>7.4f}")
    m = metrics["mean"]
    rows.append(f"{'mean':>5}  {m['rel_error']:>10.3e}  {_db(m['psnr'])}  {m['ssim']:>7.4f}")
    return "\n".join(rows)


def _db(v: float) -> str:
    return f"{'inf':>8}" if math.isinf(v) else f"{v:>8.2f}"
