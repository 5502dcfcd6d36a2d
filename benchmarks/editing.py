"""Edit benchmark: label edits inside a region of held-out photo patches, on the bundled TinyUNet.

    python benchmarks/editing.py            # the default below: about 4 minutes on 2 cores
    python benchmarks/editing.py --quick    # 10 steps, cfg_edit 5: a smoke run

Each of the 8 held-out 16x16 patches (one per photo, ``data.held_out``) is inverted with its
own photo's label as the source prompt (cfg 1) and edited towards another photo's label
(``(label + 4) % 8``) inside the right half (the region); the left half should stay. Editors:

- ``peer``: naive unsampling, then Euler sampling with the target label at ``cfg_edit`` over
  the whole image (FlipSigmas + euler, what ComfyUI users do today);
- ``ddim+target``: DDIM inversion, then the same whole-image sampling;
- ``blended``: blended guidance (``solvers.blended``) over the inversion of ``ddim``,
  ``aidi_anderson``, ``bdia`` or ``edict`` with its own sampler: ``w_inv`` 1 outside,
  ``cfg_edit`` inside, local blend;
- ``direct``: DirectInversion (``solvers.direct``) over DDIM inversion's trajectory, with the
  same blended guidance; ``direct whole``: DirectInversion editing the whole image (mask 1,
  no blend), as the PnP inversion paper edits;
- ``stochastic``: four edit-friendly edits (``solvers.editing.stochastic``, eta 1, seeds 0-3) over
  AIDI-A's trajectory with the same blended guidance; ``best of 4`` keeps the edit the
  classifier scores highest (as a user picks by eye), ``mean of 4`` averages the four scores.

Measures, in the model's own space (pixels in [-1, 1], no VAE):

- ``background_psnr`` / ``background_ssim``: the left half against the source (PSNR with the
  mse floored at 1e-30, so 306 dB means bit for bit; SSIM by scikit-image, 7x7 window);
- ``edit_strength``: the target label's probability for the right half, from a logistic
  regression trained here, at benchmark time, on 4,000 right halves of training-row patches
  (downsampled pixels, colour histograms, channel means and deviations; seeded, so the same
  classifier every run). It never sees the diffusion model. ``source_strength``: the same
  probability for the unedited source, the floor;
- ``nfe``: denoiser calls of inversion plus edit as the host counts them (one guided call
  is one, though cfg != 0, 1 runs the network on both halves); ``net`` counts network
  passes over the batch (a guided call is two).

The default runs 10, 20 and 50 steps at ``cfg_edit`` 5 and, at 10 steps, also 3 and 7.5 for
the strength-against-background plot. Writes editing.json, editing.md, edit_tradeoff.png
and edit_grid.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = pathlib.Path(__file__).resolve().parent
EDITORS = ("peer", "ddim+target", "blended ddim", "blended aidi_anderson", "blended bdia", "blended edict", "direct",
           "direct whole", "stochastic best of 4", "stochastic mean of 4")
SEEDS = (0, 1, 2, 3)


class Counted:
    """The benchmark's guided denoiser, counting host-style calls and network passes."""

    def __init__(self, model):
        self.model, self.calls, self.net = model, 0, 0

    def __call__(self, x, sigma, label=None, cfg=1.0):
        self.calls += 1
        self.net += 1 if label is None or cfg in (0, 1) else 2
        return self.model(x, sigma, label=label, cfg=cfg)


def features(x):
    """Classifier features of (n, 3, h, w) regions: 2x2-mean pixels, 8-bin channel histograms, means, stds."""
    import torch
    x = x.clamp(-1, 1)
    small = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
    v = x.flatten(2)
    edges = torch.linspace(-1, 1, 9)
    hist = [((v >= lo) & ((v < hi) if hi < 1 else (v <= hi))).float().mean(2) for lo, hi in zip(edges[:-1], edges[1:])]
    return torch.cat([small, *hist, v.mean(2), v.std(2)], 1).double().numpy()


def classifier(region, n=4000, seed=5):
    """A logistic regression on ``region(patches)`` of ``n`` seeded training-row patches."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from .data import Patches
    x, labels = Patches(16, seed=seed).batch(n)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    clf.fit(features(region(x)), labels.numpy())
    return clf


def strength(clf, regions, labels):
    import numpy as np
    p = clf.predict_proba(features(regions))
    return p[np.arange(len(labels)), labels.numpy()]


def run_editor(editor, model, x, src, tgt, mask, space, n, cfg_edit, clf, region):
    """One editor on the batch; returns (edited batch, extra row fields)."""
    from ..solvers import invert, sampler_for
    from ..solvers.editing.blended import edit_blended
    from ..solvers.editing.direct import edit_direct
    from ..solvers.editing.guidance import TwoPrompts
    from ..solvers.editing.stochastic import edit_stochastic
    from ..solvers.methods.euler import sample_euler
    from .reconstruction import schedule
    sig = schedule(space, n)
    two = TwoPrompts(model, {"label": src}, {"label": tgt})
    method = {"peer": "naive_unsample", "ddim+target": "ddim", "direct": "ddim", "direct whole": "ddim"}.get(
        editor, editor.split()[-1] if editor.startswith("blended") else "aidi_anderson")
    inv = invert(method, model, x, sig, {"label": src, "cfg": 1.0}, space=space,
                 keep_trajectory=editor.startswith(("direct", "stochastic")))
    c0, k0 = model.calls, model.net
    extra = {"inversion": method, "nfe_inversion": inv.nfe}
    if editor in ("peer", "ddim+target"):
        out = sample_euler(model, inv.latent, inv.sigmas.flip(0), {"label": tgt, "cfg": cfg_edit}, space=space)
    elif editor.startswith("blended"):
        fn, kw = sampler_for(inv.sampler, inv.settings)
        out, _ = edit_blended(two, inv.latent, inv.sigmas.flip(0), mask, 1.0, cfg_edit, sampler=fn, sampler_args=kw,
                              pair=inv.pair, space=space)
    elif editor == "direct":
        out, _ = edit_direct(two, inv.trajectory, inv.sigmas, mask, 1.0, cfg_edit, space=space)
    elif editor == "direct whole":
        out, _ = edit_direct(two, inv.trajectory, inv.sigmas, mask.new_ones(mask.shape), 1.0, cfg_edit, space=space,
                             local_blend=False)
    else:
        edits, _, _ = edit_stochastic(two, inv.trajectory, inv.sigmas, mask, 1.0, cfg_edit, SEEDS, space=space)
        b = x.shape[0]
        per = [strength(clf, region(edits[j * b:(j + 1) * b]), tgt) for j in range(len(SEEDS))]
        import numpy as np
        pick = np.argmax(np.stack(per), 0)
        out = edits.view(len(SEEDS), b, *x.shape[1:])[pick, range(b)]
        extra["strength_mean_of_4"] = float(np.mean(per))
    extra["nfe_edit"] = model.calls - c0
    extra["net"] = inv.nfe + model.net - k0  # the inversion runs at cfg 1: one pass per call
    return out, extra


def benchmark(spaces=("eps", "flow"), steps=(10, 20, 50), cfgs=(5.0,), sweep=(3.0, 7.5), batch=8, weights=None,
              editors=EDITORS, progress=True):
    """Every (space, steps, cfg_edit, editor); returns (rows, {key: edited batch}, (x, labels, targets, mask))."""
    jobs = [(s, n, w) for s in spaces for n in steps for w in cfgs]
    jobs += [(s, min(steps), w) for s in spaces for w in sweep if w not in cfgs]
    runs = [e for e in editors if e != "stochastic mean of 4"]
    bar = None
    if progress:  # from the first second: the set-up below takes about half a minute
        from tqdm import tqdm
        bar = tqdm(total=len(jobs) * len(runs), desc="edit benchmark", unit="run")
        bar.set_postfix_str("loading the held-out patches and the model")
    import torch
    from .data import held_out
    from .reconstruction import psnr, ssim
    from .tinyunet import load
    x, src = held_out(batch)
    tgt = (src + 4) % 8
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    region, keep = (lambda t: t[..., 8:]), (lambda t: t[..., :8])
    if bar is not None:
        bar.set_postfix_str("training the edit-strength classifier (4000 patches)")
    clf = classifier(region)
    rows, outs, models = [], {}, {}
    floor = strength(clf, region(x), tgt)
    for s, n, w in jobs:
        if s not in models:
            models[s] = Counted(load(s, (weights or {}).get(s)))
        for e in runs:
            if bar is not None:
                bar.set_postfix_str(f"{s} {n} steps cfg {w:g} {e}")
            t0 = time.perf_counter()
            out, extra = run_editor(e, models[s], x, src, tgt, mask, s, n, w, clf, region)
            row = {"space": s, "steps": n, "cfg_edit": w, "editor": e, "inversion": extra["inversion"],
                   "background_psnr": float(psnr(keep(out), keep(x)).mean()),
                   "background_ssim": float(ssim(keep(out), keep(x)).mean()),
                   "edit_strength": float(strength(clf, region(out), tgt).mean()),
                   "source_strength": float(floor.mean()),
                   "nfe": extra["nfe_inversion"] + extra["nfe_edit"], "nfe_inversion": extra["nfe_inversion"],
                   "nfe_edit": extra["nfe_edit"], "net": extra["net"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            outs[(s, n, w, e)] = out
            if "strength_mean_of_4" in extra:
                rows.append(dict(row, editor="stochastic mean of 4", edit_strength=extra["strength_mean_of_4"]))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return rows, outs, (x, src, tgt, mask)


def claims(rows, steps=10, within=0.05, margin=10.0):
    """Per space at ``steps``, two readings of "the pack's best editor keeps the background at least
    ``margin`` dB better than the peer at an edit strength at most ``within`` below the peer's":

    - ``same cfg``: at each cfg_edit, the pack's editors against the peer at that cfg;
    - ``matched strength``: the pack's deterministic editors (no best-of-4 pick) at any cfg_edit
      against the peer at its strongest cfg_edit.

    The best editor is the one with the highest background PSNR among those close enough in
    strength."""
    out = []
    pack = lambda r: r["editor"] not in ("peer", "stochastic mean of 4")
    for s in dict.fromkeys(r["space"] for r in rows):
        here = [r for r in rows if r["space"] == s and r["steps"] == steps]
        peers = [r for r in here if r["editor"] == "peer"]
        cases = [("same cfg", p, [r for r in here if r["cfg_edit"] == p["cfg_edit"] and pack(r)]) for p in peers]
        if peers:
            strongest = max(peers, key=lambda r: r["edit_strength"])
            cases.append(("matched strength", strongest,
                          [r for r in here if pack(r) and not r["editor"].startswith("stochastic")]))
        for how, peer, cands in cases:
            ok = [r for r in cands if r["edit_strength"] >= peer["edit_strength"] - within]
            best = max(ok, key=lambda r: r["background_psnr"], default=None)
            out.append({"space": s, "steps": steps, "how": how, "peer_cfg": peer["cfg_edit"],
                        "peer_psnr": peer["background_psnr"], "peer_strength": peer["edit_strength"],
                        "best": best and best["editor"], "best_cfg": best and best["cfg_edit"],
                        "best_psnr": best and best["background_psnr"], "best_strength": best and best["edit_strength"],
                        "margin_db": best and best["background_psnr"] - peer["background_psnr"],
                        "holds": bool(best and best["background_psnr"] - peer["background_psnr"] >= margin)})
    return out


# -- reporting ------------------------------------------------------------------------

def table(rows):
    """Markdown: per space, editors down; background PSNR / SSIM / strength / NFE per step count across."""
    out = []
    steps = sorted(set(r["steps"] for r in rows))
    for s in dict.fromkeys(r["space"] for r in rows):
        for w in sorted(set(r["cfg_edit"] for r in rows if r["space"] == s)):
            here = [r for r in rows if r["space"] == s and r["cfg_edit"] == w]
            cols = [n for n in steps if any(r["steps"] == n for r in here)]
            floor = here[0]["source_strength"]
            out.append(f"\n**{s.upper()}, cfg_edit {w:g}** (background PSNR dB / SSIM / edit strength / NFE; "
                       f"unedited source's strength {floor:.3f})\n")
            out.append("| editor | inversion | " + " | ".join(f"{n} steps" for n in cols) + " |")
            out.append("|---|---|" + "---|" * len(cols))
            for e in dict.fromkeys(r["editor"] for r in here):
                cells = []
                for n in cols:
                    r = next((q for q in here if q["editor"] == e and q["steps"] == n), None)
                    cells.append("" if r is None else f"{r['background_psnr']:.1f} / {r['background_ssim']:.3f} / "
                                                      f"{r['edit_strength']:.3f} / {r['nfe']}")
                inv = next(q["inversion"] for q in here if q["editor"] == e)
                out.append(f"| {e} | {inv} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def claims_table(cl):
    out = ["| space | steps | comparison | peer cfg: PSNR / strength | best pack editor (cfg) | its PSNR / strength | "
           "margin | >= 10 dB |", "|---|---|---|---|---|---|---|---|"]
    for c in cl:
        best = "none within 0.05" if c["best"] is None else f"{c['best']} ({c['best_cfg']:g})"
        vals = "" if c["best"] is None else f"{c['best_psnr']:.1f} / {c['best_strength']:.3f}"
        marg = "" if c["best"] is None else f"{c['margin_db']:.1f} dB"
        out.append(f"| {c['space']} | {c['steps']} | {c['how']} | {c['peer_cfg']:g}: {c['peer_psnr']:.1f} / "
                   f"{c['peer_strength']:.3f} | {best} | {vals} | {marg} | {'yes' if c['holds'] else 'no'} |")
    return "\n".join(out) + "\n"


def plot(rows, file, steps=10, cap=120.0):
    """Background PSNR against edit strength at ``steps``; a line per editor through its cfg_edit values,
    a panel per space. Editors at or above ``cap`` (bit for bit is 306 dB) are drawn hollow, each in a
    lane of its own above the cap, so that they do not stack into one line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .reconstruction import save
    spaces = list(dict.fromkeys(r["space"] for r in rows))
    fig, axes = plt.subplots(1, len(spaces), figsize=(6.2 * len(spaces), 5.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(r["editor"] for r in rows))
    for i, s in enumerate(spaces):
        ax = axes[0][i]
        lane = 0
        for k, e in enumerate(names):
            pts = sorted((r["cfg_edit"], r["edit_strength"], r["background_psnr"]) for r in rows
                         if r["space"] == s and r["steps"] == steps and r["editor"] == e)
            if not pts:
                continue
            capped = all(p[2] >= cap for p in pts)
            if capped:
                lane += 1
            ys = [cap + 6 * lane if capped else min(p[2], cap) for p in pts]
            ax.plot([p[1] for p in pts], ys, marker="os^Dv<>phX"[k % 10], ms=5, lw=1.2, color=cmap(k % 10),
                    mfc="none" if capped else cmap(k % 10), label=e,
                    ls="--" if e in ("peer", "ddim+target") else "-")
            for (w, a, _), y in zip(pts, ys):
                ax.annotate(f"{w:g}", (a, y), fontsize=6, xytext=(2, 3), textcoords="offset points")
        floor = next(r["source_strength"] for r in rows if r["space"] == s)
        ax.axvline(floor, color="grey", lw=0.8, ls=":")
        ax.axhline(cap + 3, color="grey", lw=0.6, ls=":")
        ax.text(0.01, cap + 2, f"above: hollow, {cap:g} dB or more (306 = bit for bit), a lane per editor",
                fontsize=7, color="0.35", va="top", transform=ax.get_yaxis_transform())
        ax.set_ylim(0, cap + 6 * (lane + 1) + 2)
        ax.set_xlabel("edit strength (target label's probability, region)")
        ax.set_ylabel("background PSNR (dB)")
        ax.set_title(f"{s.upper()}, {steps} steps (numbers: cfg_edit; dotted: unedited)")
        ax.grid(alpha=0.3)
    save(fig, axes, file)


def grid(outs, originals, file, steps=10, cfg=5.0, scale=4):
    """Per space a block: the source, the region (right half lit), a patch of the target photo, each editor."""
    from PIL import Image, ImageDraw
    from .data import held_out
    from .reconstruction import label_font, strip
    x, src, tgt, mask = originals
    keys = [k for k in outs if k[1] == steps and k[2] == cfg]
    spaces = list(dict.fromkeys(k[0] for k in keys))
    names = list(dict.fromkeys(k[3] for k in keys))
    region = x * (0.35 + 0.65 * mask)
    ex, _ = held_out(16)
    target = ex[8:16][tgt] if len(ex) >= 16 else ex[tgt]  # a second held-out patch of each target photo
    b, _, h, w = x.shape
    font = label_font()
    label_w, gap, head = 190, 10, 28
    cw, ch = (b * (w + 2) - 2) * scale, h * scale
    rows_ = ["source", "region (right half)", "target photo (example)"] + names
    img = Image.new("RGB", (label_w + len(spaces) * (cw + gap), head + len(rows_) * (ch + 4)), "white")
    d = ImageDraw.Draw(img)
    for j, s in enumerate(spaces):
        x0 = label_w + j * (cw + gap)
        d.text((x0, 4), f"{s.upper()}, {steps} steps, cfg_edit {cfg:g}", fill="black", font=font)
        for i, t in enumerate([x, region, target] + [outs[(s, steps, cfg, e)] for e in names]):
            img.paste(Image.fromarray(strip(t)).resize((cw, ch), Image.NEAREST), (x0, head + i * (ch + 4)))
    for i, c in enumerate(rows_):
        d.text((4, head + i * (ch + 4) + ch // 2 - 7), c, fill="black", font=font)
    img.save(file)


def write(rows, outs, originals, out, meta):
    import torch
    from .reconstruction import _commit, _json_default
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                commit=_commit())
    cl = claims(rows)
    (out / "editing.json").write_text(json.dumps({"meta": meta, "rows": rows, "claims": cl}, indent=1,
                                                 default=_json_default))
    md = ["# Edit benchmark", "", f"Command: `{meta['command']}`; wall time {meta['seconds']:.0f} s on "
          f"{meta['threads']} thread(s), torch {meta['torch']}, commit {meta['commit']}.",
          "8 held-out 16x16 photo patches, each edited from its photo's label to another's inside the right half; "
          "background = the left half.", table(rows), "## The claim at 10 steps", "", claims_table(cl)]
    (out / "editing.md").write_text("\n".join(md))
    plot(rows, out / "edit_tradeoff.png")
    grid(outs, originals, out / "edit_grid.png", steps=min(r["steps"] for r in rows))


def main(argv=None):
    p = argparse.ArgumentParser(description="Edit benchmark on the bundled TinyUNet.")
    p.add_argument("--spaces", nargs="+", default=["eps", "flow"], choices=["eps", "flow"])
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    p.add_argument("--cfg", nargs="+", type=float, default=[5.0], help="cfg_edit at every step count")
    p.add_argument("--sweep", nargs="*", type=float, default=[3.0, 7.5], help="extra cfg_edit at the fewest steps")
    p.add_argument("--editors", nargs="+", default=list(EDITORS), choices=list(EDITORS))
    p.add_argument("--quick", action="store_true", help="10 steps, cfg_edit 5 only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=pathlib.Path, default=None)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "out")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.sweep = [10], []
    import torch
    torch.set_num_threads(a.threads)
    weights = {s: a.weights / f"tinyunet_{s}.safetensors" for s in a.spaces} if a.weights else None
    t0 = time.perf_counter()
    rows, outs, originals = benchmark(a.spaces, a.steps, a.cfg, a.sweep, weights=weights, editors=a.editors)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/editing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write(rows, outs, originals, a.out, dict(command=command.strip(), seconds=seconds))
    print((a.out / "editing.md").read_text())
    print(f"wrote {a.out}/editing.md, editing.json, edit_tradeoff.png, edit_grid.png in {seconds:.0f} s")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(HERE))
        import run
        run.bootstrap()
        from inversion_suite.benchmarks import editing
        editing.main()
    else:
        main()
