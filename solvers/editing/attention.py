"""Cross-attention maps of the edited words, as the edit region's raw material.

For each cross-attention layer: the probabilities ``softmax(q k^T / sqrt(d))`` of the edited
tokens, summed over tokens and averaged over heads (prompt-to-prompt's local blend), laid
on the layer's grid, 3x3 max-pooled and resized to the latent. ``nodes/host/attention.py``
computes them in the host's attention calls and the edit denoiser returns each call's maps;
the editor keeps them in ``Maps``, whose mean ``masks.shape_mask`` turns into a mask. Pure
torch, in float32 or wider.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core import work_dtype


def token_attention(q, k, heads: int, tokens) -> torch.Tensor:
    """(B, HW) attention of the queries on ``tokens``, summed over tokens, mean over heads."""
    b, n, inner = q.shape
    d = inner // heads
    dt = work_dtype(q.dtype)
    qh = q.to(dt).view(b, n, heads, d).transpose(1, 2)
    kh = k.to(dt).view(b, k.shape[1], heads, d).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return probs[..., list(tokens)].sum(-1).mean(1)


def joint_token_attention(q, k, text: int, tokens, chunk: int = 1024) -> torch.Tensor:
    """(B, N) attention of the image queries of a joint [context, image] attention on ``tokens``.

    ``q``, ``k``: (B, heads, text + N, d). The softmax runs over every key, as the model's;
    queries go in chunks so the probabilities never exceed (B, heads, chunk, L).
    """
    dt = work_dtype(q.dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    kt = k.to(dt).transpose(-1, -2)
    cols = list(tokens)
    parts = []
    for i in range(text, q.shape[2], chunk):
        probs = torch.softmax(q[:, :, i:i + chunk].to(dt) @ kt * scale, dim=-1)
        parts.append(probs[..., cols].sum(-1).mean(1))
    return torch.cat(parts, 1)


def layer_grid(tokens: int, image: tuple):
    """(downsampling factor, grid) of a layer whose ``tokens`` queries tile ``image``-sized
    latents ((h, w), or (T, h, w) for video with every latent frame kept), or None where
    they do not form such a grid."""
    frames = image[0] if len(image) == 3 else 1
    h, w = image[-2:]
    if tokens % frames:
        return None
    per = tokens // frames
    f = max(1, round(math.sqrt(h * w / max(per, 1))))
    hh, ww = -(-h // f), -(-w // f)
    if hh * ww != per:
        return None
    return (f, (frames, hh, ww) if len(image) == 3 else (hh, ww))


def layer_map(att: torch.Tensor, grid: tuple, size: tuple) -> torch.Tensor:
    """One layer's (B, N) attention as a (B, 1, *size) map: 3x3 max-pool per frame, then resize."""
    m = att.view(att.shape[0], 1, *grid)
    if len(grid) == 3:
        m = F.max_pool3d(m, (1, 3, 3), stride=1, padding=(0, 1, 1))
        return F.interpolate(m, size=tuple(size), mode="trilinear", align_corners=False)
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)


class Maps:
    """The edited words' attention over an edit's calls so far: per (branch, layer downsampling
    factor), the sum of the layers' maps and how many were added."""

    def __init__(self):
        self.sums = {}

    def add(self, branch: str, maps) -> None:
        """``maps``: ((factor, (B, 1, *size) map), ...), one call's layers in the order they ran."""
        for factor, m in maps:
            total, n = self.sums.get((branch, factor), (0, 0))
            self.sums[(branch, factor)] = (total + m, n + 1)

    def raw(self, batch: int):
        """The branches' mean maps at one resolution, summed: (batch, 1, *size), or None before any.

        Layers at 1/4 of the latent's resolution (prompt-to-prompt's 16x16 maps on SD1.5) are
        used where the model has them, else the coarsest below that.
        """
        factors = {f for _, f in self.sums}
        if not factors:
            return None
        pick = 4 if 4 in factors else max(f for f in factors if f <= 4) if min(factors) <= 4 else min(factors)
        raw = None
        for (_, f), (total, n) in self.sums.items():
            if f == pick:
                mean = total / n
                mean = mean.repeat(batch // mean.shape[0], *[1] * (mean.ndim - 1))
                raw = mean if raw is None else raw + mean
        return raw
