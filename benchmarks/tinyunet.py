"""A small label-conditional UNet and the host denoiser contract around it.

Two variants share one network; they differ in what it reads and predicts:

- EPS (``x = x0 + sigma * eps``): the network sees ``x / sqrt(1 + sigma^2)`` and
  ``log(sigma) / 4`` and predicts ``eps``; ``x0 = x - sigma * eps``.
- flow (``x = (1 - s) x0 + s eps``): the network sees ``x`` and ``s`` and predicts the
  velocity ``v = eps - x0``; ``x0 = x - s v``.

The label is an integer class; ``classes`` (one past the last) is the null label that
training drops to with some probability, so ``D_w = D_u + w (D_c - D_u)`` (classifier-free
guidance) means something for ``w > 1``. ``Guided`` is what the solvers call:
``model(x, sigma, label=None, cfg=1.0) -> x0_hat``.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import torch
from torch import nn
from torch.nn import functional as F

WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights"
VARIANTS = ("eps", "flow")


def features(c, n=16):
    """Fourier features ``[cos(w_k c), sin(w_k c)]`` of a scalar per item, ``w_k`` from 1 to 1000."""
    w = torch.exp(torch.linspace(0, math.log(1000), n // 2, device=c.device))
    a = c.float()[:, None] * w
    return torch.cat([a.cos(), a.sin()], 1)


class Block(nn.Module):
    """Pre-norm residual block; the embedding scales and shifts the middle activations."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, 1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class TinyUNet(nn.Module):
    """Three resolutions (16, 8, 4 for a 16 px input) with skip connections; ``width`` channels at the top."""

    def __init__(self, channels=3, width=32, mult=(1, 2, 2), classes=8, emb=128):
        super().__init__()
        self.config = dict(channels=channels, width=width, mult=list(mult), classes=classes, emb=emb)
        self.classes = classes
        self.t = nn.Sequential(nn.Linear(16, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes + 1, emb)
        ch = [width * m for m in mult]
        self.inp = nn.Conv2d(channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c = ch[0]
        for i, co in enumerate(ch):
            self.down.append(Block(c, co, emb))
            c = co
            if i < len(ch) - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = Block(c, c, emb)
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i, co in reversed(list(enumerate(ch))):
            self.up.append(Block(c + co, co, emb))
            c = co
            if i > 0:
                self.unpool.append(nn.Conv2d(c, ch[i - 1], 3, padding=1))
                c = ch[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, c_noise, label):
        e = self.t(features(c_noise)) + self.label(label)
        h = self.inp(x)
        skips = []
        for i, blk in enumerate(self.down):
            h = blk(h, e)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h, e)
        for i, blk in enumerate(self.up):
            h = blk(torch.cat([h, skips.pop()], 1), e)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


def inputs(x, sigma, variant):
    """What the network reads for a state at ``sigma``: (scaled x, noise conditioning)."""
    s = sigma.reshape(-1, 1, 1, 1)
    if variant == "eps":
        # log(sigma) spreads SD's 0.03..14.6 over about -0.9..0.7; the clamp keeps
        # naive unsampling's 1e-4 (and anything smaller) finite.
        return x / (1 + s * s).sqrt(), sigma.clamp_min(1e-5).log() / 4
    return x, sigma


def denoise(net, x, sigma, label, variant):
    """``x0_hat`` from one network call; the combination runs in x's dtype (float64 stays exact there)."""
    xin, c = inputs(x.float(), sigma.float(), variant)
    out = net(xin, c, label).to(x.dtype)
    return x - sigma.to(x.dtype).reshape(-1, 1, 1, 1) * out


class Guided:
    """Host denoiser ``model(x, sigma, label=None, cfg=1.0) -> x0_hat`` with classifier-free guidance.

    ``D_w = D_u + w (D_c - D_u)``; ``label=None`` or ``w = 0`` is unconditional, ``w = 1``
    conditional (one call); otherwise both halves run as one batch of 2B. ``seconds``
    and ``cpu`` add up the wall and process CPU time spent in here, for the benchmark's
    time split.
    """

    def __init__(self, net, variant):
        self.net, self.variant = net.eval(), variant
        self.calls, self.seconds, self.cpu = 0, 0.0, 0.0

    @property
    def null(self):
        return self.net.classes

    @torch.no_grad()
    def __call__(self, x, sigma, label=None, cfg=1.0):
        t0, c0 = time.perf_counter(), time.process_time()
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(b)
        null = torch.full((b,), self.null, dtype=torch.long, device=x.device)
        if label is None or cfg == 0:
            out = denoise(self.net, x, sigma, null, self.variant)
        else:
            label = torch.as_tensor(label, device=x.device).reshape(-1).expand(b).long()
            if cfg == 1:
                out = denoise(self.net, x, sigma, label, self.variant)
            else:
                both = denoise(self.net, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null]),
                               self.variant)
                cond, unc = both.chunk(2)
                out = unc + cfg * (cond - unc)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        return out


def path(variant):
    return WEIGHTS / f"tinyunet_{variant}.safetensors"


def save(net, variant, file, meta):
    from safetensors.torch import save_file
    info = {"variant": variant, "config": json.dumps(net.config)}
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file), metadata=info)


def read(file):
    """(network in eval mode, its metadata) from a safetensors file written by ``save``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    net = TinyUNet(**json.loads(meta["config"]))
    net.load_state_dict(load_file(str(file)))
    return net.eval(), meta


def load(variant="eps", file=None):
    """The bundled (or a given) weights of ``variant`` as a ``Guided`` denoiser."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net, meta = read(file or path(variant))
    if meta.get("variant", variant) != variant:
        raise ValueError(f"{file} holds the {meta['variant']} variant, not {variant}")
    return Guided(net, variant)
