"""Reconstruction benchmark: invert held-out photo patches with every method, sample back, score.

For each space (EPS, flow), step count N and guidance scale w, every case (each
registered method with its defaults, AIDI-A as the paper runs it, and tight-tolerance
and gamma = 1 variants of the exact ones) inverts the same batch ``x`` to ``x_N`` and samples back with the method's
own sampler (``registry.reconstruct``). Scores, in the model's space (pixels in [-1, 1]):

- ``PSNR = 10 log10(2^2 / mse)`` per patch, averaged; ``SSIM`` (scikit-image, data range
  2, 7x7 window, channel axis 0) per patch, averaged; ``rel`` the worst
  ``||x_rec - x|| / ||x||``;
- ``nfe``: denoiser calls of the inversion (``Inversion.nfe``; one guided call counts
  once, as in the host, though w != 1 runs the network on a batch of 2B);
- ``cpu``: process CPU seconds of the inversion (the cheapest of up to 3 runs within
  1 CPU s; ``seconds`` is its wall time), ``vs_ddim`` its ratio to DDIM inversion's in
  the same (space, N, w) cell, and ``outside`` the share of it spent outside the
  denoiser (solver arithmetic, residual norms, Anderson solves, the host wrapper). CPU
  time, not wall time, because a shared machine's neighbours move wall time around.

- ``noise``: how noise-like the inverted state is: per channel, the std and mean of
  ``x_N / sigma_max`` (flow: ``sigma_max = 1``) and the lag-1 spatial autocorrelation
  (centred, the mean of the two axes); ``std`` averaged over channels and patches,
  ``mean`` their root mean square, ``ac`` their average. ``noise_ref`` gives the same
  for an N(0, I) draw of the latent's shape (seeded): an inversion meant for editing
  should sit near it. Pair methods (BDIA, EDICT) are judged on the state they resume from.

Schedules: ``karras(N)`` (sigma 0.03 .. 14.6, SD's range) for EPS, ``uniform_flow(N)``
for flow. A separate small study runs on the analytic Gaussian mixture (exact denoiser)
for the iteration counts of AIDI-A against plain fixed-point iteration.
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import time
from dataclasses import dataclass, field

import torch

from ..solvers import METHODS, invert, metrics, reconstruct
from ..tests.analytic import Mixture, MixtureDenoiser, karras, uniform_flow
from .data import NAMES, held_out
from .tinyunet import load


@dataclass(frozen=True)
class Case:
    """One row of the table: a registered method and the settings it runs with."""
    name: str
    method: str
    settings: dict = field(default_factory=dict)


def cases(full=False):
    """Every registered method at its defaults, then AIDI-A as the paper runs it (no carried
    pairs, DDIM guess) and the exact limits: tight tolerance, gamma = 1.

    ``full`` adds tight-tolerance plain fixed-point iteration, which alone costs as much
    as the rest of the table (20 or more NFE per step on EPS at 10 steps), and the
    official ReNoise set-ups (noise regularisation costs time, not model calls).
    """
    out = [Case(m, m) for m in METHODS]
    extra = [Case("aidi_anderson paper", "aidi_anderson", dict(carry=0, guess="ddim")),
             Case("aidi_anderson tight", "aidi_anderson", dict(tol=1e-5, iterations=50)),
             Case("bdia gamma=1", "bdia", dict(gamma=1.0)),
             Case("edict fixed", "edict", dict(order="fixed"))]
    paper = dict(window=(8, 10), first_window=(0, 5))  # the official windows (first: every t < 250)
    sd = dict(window=(2, 2), first_window=(0, 2))  # the same as the official code cuts them to 2 calls
    papers = [  # the official ReNoise set-ups: SD example (K = 1) with and without the default
                # regularisation, SDXL-Turbo (K = 9), and the pack's default regularised
              Case("renoise paper", "renoise", dict(sd, iterations=2, reg_steps=4)),
              Case("renoise paper noreg", "renoise", dict(sd, iterations=2, reg_steps=0)),
              Case("renoise turbo", "renoise", dict(paper, iterations=10, reg_steps=4)),
              Case("renoise reg", "renoise", dict(reg_steps=4))]
    if full:
        extra.insert(1, Case("fixed_point tight", "fixed_point", dict(tol=1e-5, iterations=50)))
        extra += papers
    # A variant whose method or settings the registry no longer has is left out, not an error.
    return out + [c for c in extra if c.method in METHODS and set(c.settings) <= set(METHODS[c.method].settings)]


def schedule(space, n):
    return karras(n) if space == "eps" else uniform_flow(n)


def psnr(a, b, span=2.0):
    """Per item PSNR of ``a`` against ``b``; mse floored at 1e-30 so an exact match stays finite."""
    return metrics.psnr(b, a, span, floor=1e-30)


def ssim(a, b, span=2.0):
    """Per item SSIM over (C, H, W) patches, channels averaged (scikit-image's default 7x7 uniform window)."""
    return metrics.ssim(b, a, span, window=min(7, a.shape[-1] // 2 * 2 - 1))


def timed_invert(model, case, x, sig, extra, space, budget=1.0, most=3):
    """Invert, keeping the cheapest of up to ``most`` runs until ``budget`` CPU seconds are spent.

    Costs are process CPU seconds: on a shared machine wall time follows the neighbours'
    load, CPU time what the method itself did. Inversion is deterministic, so repeats
    only steady the clock. Returns (inversion, wall s, CPU s, CPU s inside the network).
    """
    best, spent = None, 0.0
    for _ in range(most):
        c0, m0 = model.calls, model.cpu
        t0, p0 = time.perf_counter(), time.process_time()
        inv = invert(case.method, model, x, sig, extra, space=space, **case.settings)
        t, p = time.perf_counter() - t0, time.process_time() - p0
        if model.calls - c0 != inv.nfe:
            raise RuntimeError(f"{case.name}: the model saw {model.calls - c0} calls, Inversion.nfe says {inv.nfe}")
        if best is None or p < best[2]:
            best = (inv, t, p, model.cpu - m0)
        spent += p
        if spent >= budget:
            break
    return best


def noise_stats(x):
    """How noise-like ``x`` (B, C, ..., H, W) is: per channel std, mean and lag-1 autocorrelation.

    Returns ``std`` (the channels' std, averaged), ``mean`` (the root mean square of the
    channels' means) and ``ac`` (the centred lag-1 correlation along H and along W,
    averaged). N(0, I) gives 1, about 1 / sqrt(H W), and 0.
    """
    x = x.double().flatten(1, -3)  # (B, C', H, W)
    m = x.mean((-2, -1), keepdim=True)
    c = x - m
    var = c.pow(2).mean((-2, -1))
    ac = [(c[..., 1:, :] * c[..., :-1, :]).mean((-2, -1)) / var, (c[..., 1:] * c[..., :-1]).mean((-2, -1)) / var]
    return {"std": float(var.sqrt().mean()), "mean": float(m.pow(2).mean().sqrt()), "ac": float(sum(ac).mean() / 2)}


def run_case(model, case, x, labels, space, n, cfg):
    """Invert and reconstruct one batch; returns (row dict, reconstruction)."""
    sig = schedule(space, n)
    extra = {"label": labels, "cfg": cfg}
    inv, t_inv, cpu, cpu_model = timed_invert(model, case, x, sig, extra, space)
    c1 = model.calls
    t0 = time.perf_counter()
    rec = reconstruct(model, inv, extra)
    t_rec = time.perf_counter() - t0
    rel = ((rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()
    top = 1.0 if space == "flow" else float(inv.sigmas[-1])
    ref = torch.randn(inv.latent.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    row = {"space": space, "steps": n, "cfg": cfg, "case": case.name, "method": case.method,
           "settings": dict(inv.settings), "psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean()),
           "rel": float(rel), "nfe": inv.nfe, "nfe_rec": model.calls - c1, "seconds": t_inv, "cpu": cpu,
           "model_cpu": cpu_model, "outside": max(0.0, cpu - cpu_model) / max(cpu, 1e-9), "seconds_rec": t_rec,
           "unconverged": len(inv.unconverged), "unconverged_steps": list(inv.unconverged), "residual": max(inv.residuals) if inv.residuals else None,
           "noise": noise_stats(inv.latent / top), "noise_ref": noise_stats(ref)}
    return row, rec


def benchmark(spaces=("eps", "flow"), steps=(10, 20, 50), cfgs=(1.0, 3.0), batch=4, case_list=None,
              progress=True, weights=None):
    """Run every case; returns (rows, {(space, steps, cfg): {case name: reconstruction}}, originals)."""
    case_list = case_list or cases()
    x, labels = held_out(batch)
    jobs = [(s, n, w, c) for s in spaces for n in steps for w in cfgs for c in case_list]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="benchmark", unit="run")
    rows, recs, models = [], {}, {}
    for s, n, w, c in jobs:
        if s not in models:
            models[s] = load(s, (weights or {}).get(s))
            models[s](x, torch.full((batch,), 0.5), labels, 3.0)  # warm-up, so DDIM's time is not the first call's
        if bar is not None:
            bar.set_postfix_str(f"{s} {n} steps cfg {w:g} {c.name}")
        row, rec = run_case(models[s], c, x, labels, s, n, w)
        rows.append(row)
        recs.setdefault((s, n, w), {})[c.name] = rec
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    for r in rows:
        base = next((q for q in rows if q["case"] == "ddim" and q["space"] == r["space"]
                     and q["steps"] == r["steps"] and q["cfg"] == r["cfg"]), None)
        r["vs_ddim"] = r["cpu"] / base["cpu"] if base else None
    return rows, recs, (x, labels)


def mixture_study(batch=4, n=10, tol=3e-3, caps=(3, 16), spread=1.0, var_range=(0.05, 0.5)):
    """NFE per step and convergence of AIDI-A against fixed-point on the exact mixture denoiser.

    ``Mixture((4, 8, 8), components=4, spread=spread, var_range=var_range)``, item i drawn
    from component ``i % 4`` and labelled with it; ``karras(n)`` for EPS, ``uniform_flow(n)``
    for flow; cfg 1 and 3; each method at round-trip target ``tol`` with each call budget in ``caps``
    (``iterations``: model calls per step on average). ``spread=3, var_range=(0.01, 0.05)``
    gives components far apart compared with their width, where steps must be split.
    """
    mix = Mixture((4, 8, 8), components=4, spread=spread, var_range=var_range)
    labels = torch.arange(batch) % 4
    x = torch.cat([mix.sample(1, seed=10 + i, component=int(k)) for i, k in enumerate(labels)]).float()
    rows = []
    for space in ("eps", "flow"):
        model = MixtureDenoiser(mix, space)
        for cfg in (1.0, 3.0):
            for cap in caps:
                for m in ("fixed_point", "aidi_anderson"):
                    inv = invert(m, model, x, schedule(space, n), {"label": labels, "cfg": cfg}, space=space,
                                 tol=tol, iterations=cap)
                    rec = reconstruct(model, inv, {"label": labels, "cfg": cfg})
                    rows.append({"space": space, "cfg": cfg, "method": m, "cap": cap, "tol": tol, "steps": n,
                                 "refined_steps": inv.steps, "nfe": inv.nfe, "nfe_per_step": inv.nfe / n,
                                 "unconverged": list(inv.unconverged), "residual": max(inv.residuals),
                                 "rel": float(((rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()),
                                 "psnr": float(psnr(rec.double(), x.double(), span=float(x.max() - x.min())).mean())})
    return rows


# -- reporting ------------------------------------------------------------------------

def _cell(rows, space, cfg, n, case):
    return next((r for r in rows if r["space"] == space and r["cfg"] == cfg and r["steps"] == n and r["case"] == case),
                None)


def _f(v, fmt):
    return "" if v is None else fmt.format(v)


def layout(rows):
    """The spaces, cfgs, step counts and cases of the rows: each in order of first appearance, steps sorted."""
    first = lambda key: list(dict.fromkeys(r[key] for r in rows))
    return first("space"), first("cfg"), sorted(set(r["steps"] for r in rows)), first("case")


def save(fig, axes, file):
    """Writes a figure of panels, the legend to the right of the top row's last panel."""
    import matplotlib.pyplot as plt
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def table(rows):
    """Markdown: per (space, cfg) one table, methods down, PSNR / SSIM / NFE per step count across."""
    out = []
    spaces, cfgs, steps, names = layout(rows)
    top = steps[-1]
    for s in spaces:
        for w in cfgs:
            out.append(f"\n**{s.upper()}, cfg {w:g}** (PSNR dB / SSIM / inversion NFE; CPU time of the inversion at {top} steps)\n")
            head = ["method"] + [f"{n} steps" for n in steps] + ["CPU time vs DDIM", "outside model"]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for c in names:
                cells = []
                for n in steps:
                    r = _cell(rows, s, w, n, c)
                    flag = f" ({r['unconverged']} unconv.)" if r and r["unconverged"] else ""
                    cells.append("" if r is None else f"{r['psnr']:.1f} / {r['ssim']:.4f} / {r['nfe']}{flag}")
                r = _cell(rows, s, w, top, c)
                cells += [_f(r and r["vs_ddim"], "{:.2f}x"), _f(r and 100 * r["outside"], "{:.0f}%")]
                out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def noise_table(rows):
    """Markdown: per (space, cfg), each case's std / mean / lag-1 autocorrelation of x_N / sigma_max."""
    out = []
    spaces, cfgs, steps, names = layout(rows)
    for s in spaces:
        for w in cfgs:
            out.append(f"\n**{s.upper()}, cfg {w:g}** (std / mean / lag-1 autocorrelation of x_N / sigma_max)\n")
            head = ["method"] + [f"{n} steps" for n in steps]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            ref = next(r for r in rows if r["space"] == s and r["cfg"] == w)["noise_ref"]
            out.append("| N(0, I) | " + " | ".join(f"{ref['std']:.2f} / {ref['mean']:.2f} / {ref['ac']:.2f}"
                                                  for _ in steps) + " |")
            for c in names:
                cells = []
                for n in steps:
                    r = _cell(rows, s, w, n, c)
                    q = r and r.get("noise")
                    cells.append("" if not q else f"{q['std']:.2f} / {q['mean']:.2f} / {q['ac']:.2f}")
                out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def mixture_table(rows):
    out = ["| space | cfg | cap | method | NFE / step | unconverged steps | max residual | PSNR dB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['space']} | {r['cfg']:g} | {r['cap']} | {r['method']} | {r['nfe_per_step']:.1f} | "
                   f"{r['unconverged'] or 'none'} | {r['residual']:.1e} | {r['psnr']:.1f} |")
    return "\n".join(out) + "\n"


# One colour map per method family (shades within it), one marker per step count.
FAMILIES = (("first order", ("ddim", "naive_unsample", "easyinv"), "Greys"),
            ("fixed point", ("fixed_point", "aidi_anderson", "aidi_empirical"), "Blues"),
            ("ReNoise", ("renoise",), "Oranges"),
            ("exact", ("bdia", "edict"), "Greens"),
            ("second order", ("rf_solver", "fireflow"), "Purples"))
STEP_MARKS = {10: "o", 20: "s", 50: "^"}
CAP = 160.0  # dB: an exact method at float rounding; points above are drawn here, hollow


def colours(rows, names):
    """case -> colour: its method's family map, shades spread over that family's cases."""
    import matplotlib.pyplot as plt
    method = {r["case"]: r["method"] for r in rows}
    out = {}
    for _, members, cmap in FAMILIES:
        cases = [c for c in names if method.get(c) in members]
        for i, c in enumerate(cases):
            out[c] = plt.get_cmap(cmap)(0.45 + 0.5 * (i + 1) / (len(cases) + 1))
    return out


def plot(rows, file):
    """PSNR against inversion NFE, one line per case through its step counts, a panel per (space, cfg):
    a colour family per kind of method, a marker per step count, capped points hollow at the cap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    spaces, cfgs, _, names = layout(rows)
    fig, axes = plt.subplots(len(spaces), len(cfgs), figsize=(5.5 * len(cfgs), 4.2 * len(spaces)), squeeze=False)
    colour = colours(rows, names)
    for i, s in enumerate(spaces):
        for j, w in enumerate(cfgs):
            ax = axes[i][j]
            for c in names:
                pts = sorted((r["nfe"], r["psnr"], r["steps"]) for r in rows
                             if r["space"] == s and r["cfg"] == w and r["case"] == c)
                if not pts:
                    continue
                style = "--" if "tight" in c or "=" in c or "paper" in c or "fixed" == c.split()[-1] else "-"
                ax.plot([p[0] for p in pts], [min(p[1], CAP) for p in pts], color=colour[c], lw=1.2, ls=style,
                        label=c)
                for nfe, db, n in pts:
                    ax.plot(nfe, min(db, CAP), marker=STEP_MARKS.get(n, "x"), ms=5, color=colour[c],
                            mfc="none" if db > CAP else colour[c])
            ax.axhline(CAP, color="0.6", lw=0.6, ls=":")
            ax.set_xscale("log")
            ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                     if any(r["nfe"] <= 2 * t and r["nfe"] >= t / 2 for r in rows)]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(top=CAP + 8)
            ax.set_xlabel("inversion NFE")
            ax.set_ylabel("reconstruction PSNR (dB)")
            ax.set_title(f"{s.upper()}, cfg {w:g}")
            ax.grid(alpha=0.3)
    steps = [Line2D([], [], color="0.3", marker=m, ls="none", label=f"{n} steps") for n, m in STEP_MARKS.items()]
    steps.append(Line2D([], [], color="0.3", marker="o", mfc="none", ls="none", label=f"above {CAP:g} dB (capped)"))
    axes[-1][-1].legend(handles=steps, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save(fig, axes, file)


def strip(t):
    """A batch of (3, h, w) images in [-1, 1] side by side, 2 white pixels apart, as uint8 (h, w', 3)."""
    import numpy as np
    t = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    pad = np.full((t.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate(sum([[im, pad] for im in t], [])[:-1], 1)


def label_font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def grid(recs, originals, file, steps=None, scale=4):
    """Originals over each case's reconstructions, one column block per (space, cfg) at ``steps``."""
    from PIL import Image, ImageDraw
    keys = [k for k in recs if steps is None or k[1] == steps]
    if not keys:
        return
    x = originals[0]
    names = list(recs[keys[0]])
    b, _, h, w = x.shape
    font = label_font()
    label_w, gap = 150, 8
    cw, ch = (b * (w + 2) - 2) * scale, h * scale
    head = 28
    img = Image.new("RGB", (label_w + len(keys) * (cw + gap), head + (len(names) + 1) * (ch + 4)), "white")
    d = ImageDraw.Draw(img)
    for j, k in enumerate(keys):
        x0 = label_w + j * (cw + gap)
        d.text((x0, 4), f"{k[0].upper()} cfg {k[2]:g}, {k[1]} steps", fill="black", font=font)
        for i, t in enumerate([x] + [recs[k][c] for c in names]):
            tile = Image.fromarray(strip(t)).resize((cw, ch), Image.NEAREST)
            img.paste(tile, (x0, head + i * (ch + 4)))
    for i, c in enumerate(["original"] + names):
        d.text((4, head + i * (ch + 4) + ch // 2 - 7), c, fill="black", font=font)
    img.save(file)


def write(rows, recs, originals, out, mix=None, meta=None, grid_steps=None):
    """Table (results.md), JSON (results.json), plot (psnr_vs_nfe.png), grid (grid.png) under ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {}, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                images=list(NAMES), commit=_commit())
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "mixture": mix},
                                                 indent=1, default=_json_default))
    md = ["# Reconstruction benchmark", "", f"Command: `{meta.get('command', '')}`; wall time "
          f"{meta.get('seconds', 0):.0f} s on {meta['threads']} thread(s), torch {meta['torch']}, "
          f"commit {meta['commit']}.",
          f"Batch of {meta.get('batch', '?')} held-out 16x16 photo patches; PSNR/SSIM in pixel space [-1, 1].",
          table(rows),
          "## How noise-like the inverted state is", "", noise_table(rows)]
    if mix:
        md += ["## AIDI-A against fixed-point on the analytic mixture", "", mixture_table(mix)]
    (out / "results.md").write_text("\n".join(md))
    plot(rows, out / "psnr_vs_nfe.png")
    grid(recs, originals, out / "grid.png", steps=grid_steps or min(r["steps"] for r in rows))


def _commit():
    """The pack's git commit (``+dirty`` when its solvers differ from it), or None outside a checkout."""
    import subprocess
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "solvers"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)
