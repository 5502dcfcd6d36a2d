"""Train the bundled TinyUNet denoisers (EPS and flow) on patches of real photographs.

    python benchmarks/train.py                 # both variants, the bundled settings
    python benchmarks/train.py --variant flow --steps 200 --out trial-weights

Deterministic: fixed seeds, one generator for the data and one for the noise,
``torch.use_deterministic_algorithms(True)`` and 2 threads, so a rerun with the same torch
build writes the same weights. The saved weights are the EMA of the training weights.

Losses (plain MSE on the network output):

- EPS: ``x = x0 + sigma eps``, ``log sigma ~ U(log 0.002, log 20)``, target ``eps``;
- flow: ``x = (1 - s) x0 + s eps``, ``s = sigmoid(n)``, ``n ~ N(0, 1)`` (with a
  fifth of the batch ``s ~ U(0, 1)`` so both ends are seen), target ``v = eps - x0``.

The label is the source image's index, replaced by the null label with probability
``drop`` so the same network is also the unconditional model.
"""

import argparse
import copy
import math
import os
import pathlib
import sys
import time

# Sleeping rather than spinning OpenMP workers: on a shared 2-core machine spinning
# threads slow training several-fold. Read once, when torch loads; no effect on results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if __package__ in (None, ""):
    # Run as a script: load the pack as ``inversion_suite`` (pack.py).
    from pack import load
    load()
    from inversion_suite.benchmarks import data
    from inversion_suite.benchmarks.tinyunet import VARIANTS, TinyUNet, WEIGHTS, inputs, save
else:
    from . import data
    from .tinyunet import VARIANTS, TinyUNet, WEIGHTS, inputs, save

DEFAULTS = dict(steps=1500, batch=128, lr=2e-3, warmup=100, ema=0.999, drop=0.15, width=32, size=16, seed=0)


def noise_levels(n, variant, g):
    """Training sigmas: log-uniform for EPS, logit-normal (a fifth uniform) for flow."""
    if variant == "eps":
        lo, hi = math.log(0.002), math.log(20.0)
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=g))
    s = torch.sigmoid(torch.randn(n, generator=g))
    u = torch.rand(n, generator=g)
    k = n // 5
    return torch.cat([s[k:], u[:k]]).clamp(1e-4, 1.0)


def noisy(x0, sigma, eps, variant):
    """The state at ``sigma`` and the network's target."""
    s = sigma.reshape(-1, 1, 1, 1)
    if variant == "eps":
        return x0 + s * eps, eps
    return (1 - s) * x0 + s * eps, eps - x0


def lr_at(k, steps, lr, warmup):
    """Linear warmup, then cosine decay to a tenth."""
    if k < warmup:
        return lr * (k + 1) / warmup
    t = (k - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(variant, steps=1500, batch=128, lr=2e-3, warmup=100, ema=0.999, drop=0.15, width=32, size=16, seed=0,
          progress=True):
    """Train one variant; returns (EMA network, final mean loss over the last 100 steps)."""
    torch.manual_seed(seed)
    pat = data.Patches(size=size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = TinyUNet(width=width, classes=len(data.NAMES))
    avg = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    losses = []
    bar = range(steps)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"train {variant}", unit="step", mininterval=2)
    for k in bar:
        x0, label = pat.batch(batch)
        label = torch.where(torch.rand(batch, generator=g) < drop, len(data.NAMES), label)
        sigma = noise_levels(batch, variant, g)
        x, target = noisy(x0, sigma, torch.randn(x0.shape, generator=g), variant)
        xin, c = inputs(x, sigma, variant)
        loss = (net(xin, c, label) - target).pow(2).mean()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(k, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        # The EMA's decay ramps up so the first steps' weights do not linger.
        d = min(ema, (1 + k) / (10 + k))
        with torch.no_grad():
            for a, p in zip(avg.parameters(), net.parameters()):
                a.lerp_(p, 1 - d)
        losses.append(loss.item())
        if progress and k % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return avg.eval(), sum(losses[-100:]) / len(losses[-100:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=VARIANTS + ("both",), default="both")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k, type=type(v), default=v)
    p.add_argument("--out", type=pathlib.Path, default=WEIGHTS, help="folder for tinyunet_<variant>.safetensors")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in DEFAULTS}
    command = "python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for variant in (VARIANTS if a.variant == "both" else (a.variant,)):
        t0 = time.perf_counter()
        net, loss = train(variant, **settings)
        dt = time.perf_counter() - t0
        file = a.out / f"tinyunet_{variant}.safetensors"
        # Wall time is printed, not stored, so a rerun writes byte-identical files.
        save(net, variant, file, dict(settings, command=command.strip(), threads=a.threads,
                                      torch=torch.__version__, images=list(data.NAMES), final_loss=round(loss, 4),
                                      params=sum(p.numel() for p in net.parameters())))
        print(f"{variant}: {sum(p.numel() for p in net.parameters())} parameters, final loss {loss:.4f}, "
              f"{dt:.0f} s -> {file}", flush=True)


if __name__ == "__main__":
    main()
