"""Edit benchmark: label edits inside a region of held-out photo patches, on the bundled TinyUNet.

    python benchmarks/editing.py            # the default below: about 3 minutes on 2 cores
    python benchmarks/editing.py --quick    # cfg_edit 5 and each editor's middle knob only: ~30 s

Each of the 8 held-out 16x16 patches (one per photo, ``data.held_out``) is edited from its own
photo's label (the source prompt, cfg 1) towards another photo's label (``(label + 4) % 8``)
inside the right half (the region); the left half should stay. Editors, each swept over its
own strength knob and over ``cfg_edit`` (3, 5, 7.5; the FlowEdit rows also 4, 4.5 and 6) at 10 steps:

- the peers, as users run them today:
  - ``peer``: naive unsampling, then Euler sampling with the target label at ``cfg_edit`` over
    the whole image (FlipSigmas + euler); ``ddim+target``: DDIM inversion, the same sampling;
  - ``inpaint``: core inpainting exactly as the host runs it (VAE Encode -> Set Latent Noise
    Mask -> KSampler euler at ``denoise`` 0.6, 0.8, 1.0; ``inpaint`` below restates the host's
    ``KSamplerX0Inpaint``, and ``tests/test_inpaint_peer.py`` proves it equal to the host's
    KSampler through its executor); ``inpaint_dd``: the same with DifferentialDiffusion and a
    mask feathered over ``FEATHER`` px across the region's edge;
  - ``flowedit``: FlowEdit by its official rule (``solvers.editing.flowedit``: n_min 0, n_avg 1,
    source cfg 1) at ``n_max`` 6, 8, 10 over the whole image, composited by the region's mask
    (the edit pasted into the region, the source kept outside); ``flowedit whole``: the same
    not composited;
  - the seeded peers run seeds 0-3 and report the means;
- the pack's editors: ``flowedit antithetic``, the pack's FlowEdit at its node's defaults
  (antithetic pairs of draws, the whole image edited and composited by the region feathered
  over 1 pixel; ``n_max`` 6 to 10, its own knob swept finer, seeds 0-3); ``flowedit region``, the pack's FlowEdit
  weighing every step by its region (the mask multiplies the velocity difference at every
  step, so the source stays exactly outside; the paper's draws), and, each over an inversion
  run part-way (``denoise`` 1.0, 0.8, 0.6: the
  host's KSampler schedule cut as Invert's ``denoise`` cuts it):
  - ``blended``: blended guidance (``solvers.editing.blended``) over the inversion of ``ddim``,
    ``aidi_anderson``, ``bdia`` or ``edict`` with its own sampler: ``w_inv`` 1 outside,
    ``cfg_edit`` inside, local blend;
  - ``direct``: DirectInversion (``solvers.editing.direct``) over DDIM inversion's trajectory,
    with the same blended guidance; ``direct whole``: DirectInversion editing the whole image
    (mask 1, no blend), as the PnP inversion paper edits;
  - ``stochastic``: four edit-friendly edits (``solvers.editing.stochastic``, eta 1, seeds 0-3)
    over AIDI-A's trajectory with the same blended guidance; ``best of 4`` keeps the edit the
    classifier scores highest (as a user picks by eye), ``mean of 4`` averages the four.

Measures, in the model's own space (pixels in [-1, 1], no VAE), means over the patches:

- ``background_psnr`` / ``background_ssim``: the left half against the source (PSNR with the
  mse floored at 1e-30, so 306 dB means bit for bit; SSIM by scikit-image, 7x7 window);
- ``edit_strength``: the target label's probability for the right half, from a logistic
  regression trained here, at benchmark time, on 4,000 right halves of training-row patches
  (downsampled pixels, colour histograms, channel means and deviations; seeded, so the same
  classifier every run). It never sees the diffusion model. ``source_strength``: the same
  probability for the unedited source, the floor;
- ``structure``: the layout kept inside the region, ``metrics.structure``: the correlation of
  the 2x2-mean luminance of the edited right half with the source's, each centred and
  normalised (the source scores 1, another held-out patch 0.09 on average);
- ``seam_ratio``: ``metrics.seam_ratio``: the mean step across the region's edge over the mean
  step between the columns beside it, one pixel in on each side (the source scores 1.11);
- ``nfe``: denoiser calls of inversion plus edit as the host counts them (one guided call
  is one, though cfg != 0, 1 runs the network on both halves); ``net`` counts network
  passes over the batch (a guided call is two);
- ``setting``: the editor's own knob and its value (``{"denoise": 0.8}``, ``{"n_max": 8}``;
  the whole-image peers: ``{"cfg_edit": 5}``); ``frontier``: whether no other setting of the
  same editor (same space and steps) is at least as strong and keeps at least as much
  structure, and better in one.

The default runs 10 steps, the whole sweep: 342 runs, 278 s wall on this project's 2-core machine
(a run is 0.3 to 4 s, AIDI-A's stochastic edits the longest).
``--steps 10 20 50`` adds the other step counts at cfg_edit 5 (every knob). A progress bar shows
each run from the first second.
Writes editing.json, editing.md (ending with each frontier point of inpainting and FlowEdit
against the pack's editor keeping the most structure at no weaker edit, ``compare``, and issue
23's gate, ``gate``),
edit_tradeoff.png and edit_grid.png to --out.
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
PEERS = ("peer", "ddim+target", "inpaint", "inpaint_dd", "flowedit", "flowedit whole")
PACK = ("flowedit antithetic", "flowedit region", "blended ddim", "blended aidi_anderson", "blended bdia",
        "blended edict", "direct", "direct whole", "stochastic best of 4", "stochastic mean of 4")
EDITORS = PEERS + PACK
SEEDS = (0, 1, 2, 3)
CFGS = (3.0, 5.0, 7.5)
FINE = (4.0, 4.5, 6.0)  # FlowEdit's editors also run these, so their frontiers can be read at the gate's strengths
DENOISE = (1.0, 0.8, 0.6)
N_MAX = (6, 8, 10)  # at 10 steps; other step counts scale them
OWN_N_MAX = (6, 7, 8, 9, 10)  # the pack's FlowEdit: its knob swept finer, as its user tunes it
# The FlowEdit node's defaults as the solver takes them (tests/test_edit_nodes.py checks the node against them).
NODE_DEFAULTS = {"antithetic": True, "paste": True, "feather": 1}
FEATHER = 4  # px: inpaint_dd's mask ramps linearly over the 4 columns around the region's edge
SIGMA_MAX = {"eps": 14.6, "flow": 1.0}  # the schedules' top: the benchmark model's sigma_max


def knobs(editor, steps):
    """The editor's own strength settings at ``steps``."""
    if editor in ("peer", "ddim+target"):
        return [{}]
    if editor.startswith("flowedit"):
        grid = OWN_N_MAX if editor == "flowedit antithetic" else N_MAX
        return [{"n_max": max(1, round(k * steps / 10))} for k in grid]
    return [{"denoise": d} for d in DENOISE]


def middle(editor, steps):
    """The knob's middle setting (the quick run's, and the grid's): denoise 1, n_max 8 of 10."""
    return {"n_max": max(1, round(8 * steps / 10))} if editor.startswith("flowedit") else knobs(editor, steps)[0]


class Counted:
    """The benchmark's guided denoiser, counting host-style calls and network passes."""

    def __init__(self, model):
        self.model, self.calls, self.net = model, 0, 0

    def __call__(self, x, sigma, label=None, cfg=1.0):
        self.calls += 1
        self.net += 1 if label is None or cfg in (0, 1) else 2
        return self.model(x, sigma, label=label, cfg=cfg)


# -- the host's inpainting, restated ----------------------------------------------------------

class Discrete:
    """SD1.x's discrete schedule as the host's ``ModelSamplingDiscrete`` holds it (scaled-linear
    betas 0.00085..0.012, 1000 steps; float32 sigmas): ``timestep`` is the nearest index in
    log sigma, as the host's; DifferentialDiffusion reads it on EPS models."""

    def __init__(self, start=0.00085, end=0.012, n=1000):
        import torch
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, 0)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()
        self.sigma_min = self.sigmas[0]

    def timestep(self, sigma):
        d = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return d.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


class Flow:
    """A flow model's ``ModelSamplingDiscreteFlow`` (shift 1, multiplier 1000): ``timestep`` is
    ``1000 sigma``, ``sigma_min`` its first table entry (1/1000)."""

    sigma_min = 1e-3

    @staticmethod
    def timestep(sigma):
        return sigma * 1000


def differential(sampling, sigma, mask, sigmas):
    """DifferentialDiffusion's per-call mask (strength 1), as the host's node computes it: the
    soft mask thresholded at the current timestep's place between the schedule's first sigma
    and ``sigma_min``, so a pixel joins the region once the noise level falls to its value."""
    ts = sampling.timestep
    to = sampling.sigma_min if not sigmas[-1] > sampling.sigma_min else sigmas[-1]
    ts_from, ts_to, now = ts(sigmas[0]), ts(to), ts(sigma[0])
    threshold = (now - ts_to) / (ts_from - ts_to)
    return (mask >= threshold).to(mask.dtype)


def noise_scaling(space, sigma, noise, latent, max_denoise=False):
    """The host's model sampling: the noised latent at ``sigma`` (EPS ``x + sigma e``, at the
    schedule's top ``x + sqrt(1 + sigma^2) e``; flow ``(1 - sigma) x + sigma e``)."""
    if space == "flow":
        return sigma * noise + (1.0 - sigma) * latent
    import torch
    return noise * (torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma) + latent


def inpaint(model, latent, noise, sigmas, mask, *, space="eps", max_denoise=False, sampling=None, extra_args=None):
    """Core inpainting, the host's rule: KSampler (euler) over ``latent`` with a noise mask.

    ``sigmas``: KSampler's descending schedule (denoise included, ending at 0); ``noise``: the
    seeded initial noise (``comfy.sample.prepare_noise``); ``mask``: the latent noise mask,
    (B or 1, 1, H, W) in [0, 1]; ``max_denoise``: the schedule starts at the model's
    sigma_max. The start is ``noise_scaling(sigmas[0])``; each Euler call (the host's
    ``KSamplerX0Inpaint``) feeds the model ``x m + noised(latent, sigma) (1 - m)`` and takes
    its output as ``D m + latent (1 - m)``, the step ``x + (sigma' - sigma)(x - D) / sigma``.
    ``sampling`` (``Discrete()``, ``Flow()`` or a host's ``model_sampling``) turns on
    DifferentialDiffusion: ``m`` is ``differential`` of the mask at each call. Returns
    (latent, model calls).
    """
    import torch
    extra = extra_args or {}
    s_in = latent.new_ones([latent.shape[0]])
    x = noise_scaling(space, sigmas[0], noise, latent, max_denoise)
    calls = 0
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        m = mask if sampling is None else differential(sampling, sigma * s_in, mask, sigmas)
        keep = 1.0 - m
        xin = x * m + noise_scaling(space, sigma, noise, latent) * keep
        den = model(xin, sigma * s_in, **extra)
        calls += 1
        den = den * m + latent * keep
        x = x + (x - den) / sigma * (sigmas[i + 1] - sigma)
    if not torch.isfinite(x).all():
        raise RuntimeError("inpaint: the output is not finite")
    return x, calls


def host_sigmas(space, steps, denoise):
    """KSampler's descending schedule at ``denoise``: the last ``steps + 1`` of ``steps / denoise``."""
    from .reconstruction import schedule
    total = steps if denoise > 0.9999 else int(steps / denoise)
    return schedule(space, total)[:steps + 1].flip(0)


def seeded_noise(shape, seed):
    """``comfy.sample.prepare_noise``'s draw: the CPU generator seeded with ``seed``."""
    import torch
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def feathered(mask, width=FEATHER):
    """The right-half mask with a linear ramp over ``width`` columns centred on its edge."""
    import torch
    w = mask.shape[-1]
    edge = int(mask[0, 0, 0].argmax())
    cols = torch.arange(w, dtype=mask.dtype) + 0.5
    return ((cols - edge) / width + 0.5).clamp(0, 1).expand(mask.shape).clone()


# -- running the editors ----------------------------------------------------------------------

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


class Bench:
    """The fixed inputs of a run and its measures; inversions shared between editors."""

    def __init__(self, x, src, tgt, mask, clf):
        self.x, self.src, self.tgt, self.mask, self.clf = x, src, tgt, mask, clf
        self.inversions, self.flowedits = {}, {}

    def region(self, t):
        return t[..., 8:]

    def keep(self, t):
        return t[..., :8]

    def measure(self, out):
        """Per-patch measures of an edited batch."""
        from ..solvers import metrics
        from .reconstruction import psnr, ssim
        return {"background_psnr": psnr(self.keep(out), self.keep(self.x)).numpy(),
                "background_ssim": ssim(self.keep(out), self.keep(self.x)).numpy(),
                "edit_strength": strength(self.clf, self.region(out), self.tgt),
                "structure": metrics.structure(self.region(self.x), self.region(out)).numpy(),
                "seam_ratio": metrics.seam_ratio(out, self.mask).numpy()}

    def invert(self, model, method, space, steps, denoise, trajectory):
        """The source's inversion at ``denoise`` (cached), and its wall seconds."""
        from ..solvers import invert
        key = (space, steps, method, denoise, trajectory)
        if key not in self.inversions:
            t0 = time.perf_counter()
            sig = host_sigmas(space, steps, denoise).flip(0)
            inv = invert(method, model, self.x, sig, {"label": self.src, "cfg": 1.0}, space=space,
                         keep_trajectory=trajectory)
            self.inversions[key] = (inv, time.perf_counter() - t0)
        return self.inversions[key]


def mean(measures):
    """Each measure's mean over the patches (and the seeds' runs, given a list)."""
    import numpy as np
    measures = measures if isinstance(measures, list) else [measures]
    return {k: float(np.mean([m[k] for m in measures])) for k in measures[0]}


def run_editor(editor, model, bench, space, n, cfg_edit, setting):
    """One editor at one setting on the batch; returns (rows' fields, {editor: shown batch})."""
    import numpy as np
    from ..solvers import sampler_for
    from ..solvers.editing.blended import edit_blended
    from ..solvers.editing.direct import edit_direct
    from ..solvers.editing.flowedit import edit_flowedit
    from ..solvers.editing import masks
    from ..solvers.editing.guidance import TwoPrompts
    from ..solvers.editing.stochastic import edit_stochastic
    from ..solvers.methods.euler import sample_euler
    b = bench
    x, mask, tgt = b.x, b.mask, {"label": b.tgt, "cfg": cfg_edit}
    two = TwoPrompts(model, {"label": b.src}, {"label": b.tgt})
    t0 = time.perf_counter()
    extra, inv_seconds = {"inversion": "", "nfe_inversion": 0, "net_inversion": 0}, 0.0
    if editor.startswith(("inpaint", "flowedit")):
        runs, out, calls, net = [], None, 0, 0
        for seed in SEEDS:
            if editor.startswith("inpaint"):
                sig = host_sigmas(space, n, setting["denoise"])
                top = float(sig[0]) >= SIGMA_MAX[space] * (1 - 1e-5)
                sampling = None if editor == "inpaint" else (Discrete() if space == "eps" else Flow())
                m = mask if editor == "inpaint" else feathered(mask)
                c, k = model.calls, model.net
                e, _ = inpaint(model, x, seeded_noise(x.shape, seed), sig.float(), m, space=space,
                               max_denoise=top, sampling=sampling, extra_args=tgt)
                c, k = model.calls - c, model.net - k
            else:
                kind = editor if editor in ("flowedit region", "flowedit antithetic") else "flowedit"
                key = (kind, space, n, cfg_edit, setting["n_max"], seed)
                if key not in b.flowedits:  # flowedit and flowedit whole share the whole-image edit
                    c, k = model.calls, model.net
                    d = NODE_DEFAULTS
                    own = {"flowedit": {}, "flowedit region": dict(mask=mask),
                           "flowedit antithetic": dict(antithetic=d["antithetic"], paste=d["paste"],
                                                       mask=masks.Region(mask, feather=d["feather"]))}
                    e, _ = edit_flowedit(two, x, host_sigmas(space, n, 1.0), 1.0, cfg_edit, n_max=setting["n_max"],
                                         seed=seed, space=space, **own[kind])
                    b.flowedits[key] = e, model.calls - c, model.net - k
                e, c, k = b.flowedits[key]
                if editor == "flowedit":  # the whole-image edit pasted into the region
                    e = x + mask * (e - x)
            runs.append(b.measure(e))
            out = e if out is None else out
            calls, net = calls + c, net + k
        return (dict(mean(runs), nfe_edit=calls // len(SEEDS), net_edit=net // len(SEEDS), **extra), out,
                time.perf_counter() - t0)
    method = {"peer": "naive_unsample", "ddim+target": "ddim", "direct": "ddim", "direct whole": "ddim"}.get(
        editor, editor.split()[-1] if editor.startswith("blended") else "aidi_anderson")
    denoise = setting.get("denoise", 1.0)
    inv, inv_seconds = b.invert(model, method, space, n, denoise, editor.startswith(("direct", "stochastic")))
    extra = {"inversion": method, "nfe_inversion": inv.nfe, "net_inversion": inv.nfe}  # inverted at cfg 1
    c0, k0 = model.calls, model.net
    if editor in ("peer", "ddim+target"):
        out = sample_euler(model, inv.latent, inv.sigmas.flip(0), tgt, space=space)
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
        k = x.shape[0]
        runs = [b.measure(edits[j * k:(j + 1) * k]) for j in range(len(SEEDS))]
        pick = np.argmax(np.stack([r["edit_strength"] for r in runs]), 0)
        out = edits.view(len(SEEDS), k, *x.shape[1:])[pick, range(k)]
        extra["mean_of_4"] = mean(runs)
    fields = dict(mean(b.measure(out)), nfe_edit=model.calls - c0, net_edit=model.net - k0, **extra)
    return fields, out, time.perf_counter() - t0 + inv_seconds


def jobs_for(spaces, steps, cfgs, editors):
    """(space, steps, cfg_edit, editor, setting): the whole sweep at the fewest steps, cfg_edit 5
    (every knob) at the others."""
    few = min(steps)
    out = []
    for s in spaces:
        for n in steps:
            for e in editors:
                if e == "stochastic mean of 4":
                    continue
                fine = sorted(set(cfgs) | set(FINE)) if e.startswith("flowedit") and len(cfgs) > 1 else cfgs
                for k in knobs(e, n):
                    for w in (fine if n == few else [c for c in cfgs if c == 5.0] or cfgs[:1]):
                        out.append((s, n, w, e, k))
    return out


def benchmark(spaces=("eps", "flow"), steps=(10,), cfgs=CFGS, batch=8, weights=None, editors=EDITORS, progress=True,
              quick=False):
    """Every job; returns (rows, {(space, steps, cfg, editor, setting): shown batch}, (x, labels, targets, mask))."""
    jobs = jobs_for(spaces, steps, cfgs, editors)
    if quick:
        jobs = [j for j in jobs if j[4] == middle(j[3], j[1])]
    bar = None
    if progress:  # from the first second: the set-up below takes about half a minute
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="edit benchmark", unit="run")
        bar.set_postfix_str("loading the held-out patches and the model")
    import torch
    from .data import held_out
    from .tinyunet import load
    x, src = held_out(batch)
    tgt = (src + 4) % 8
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1
    if bar is not None:
        bar.set_postfix_str("training the edit-strength classifier (4000 patches)")
    bench = Bench(x, src, tgt, mask, classifier(lambda t: t[..., 8:]))
    floor = float(strength(bench.clf, bench.region(x), tgt).mean())
    rows, outs, models = [], {}, {}
    for s, n, w, e, k in jobs:
        if s not in models:
            models[s] = Counted(load(s, (weights or {}).get(s)))
        if bar is not None:
            bar.set_postfix_str(f"{s} {n} steps cfg {w:g} {e} {k}")
        fields, out, seconds = run_editor(e, models[s], bench, s, n, w, k)
        setting = dict(k) if k else {"cfg_edit": w}
        later = fields.pop("mean_of_4", None)
        row = {"space": s, "steps": n, "cfg_edit": w, "editor": e, "setting": setting, **fields,
               "source_strength": floor}
        row["nfe"] = row["nfe_inversion"] + row["nfe_edit"]
        row["net"] = row.pop("net_inversion") + row.pop("net_edit")
        row["seconds"] = seconds
        rows.append(row)
        outs[(s, n, w, e, json.dumps(setting))] = out
        if later is not None:
            rows.append(dict(row, editor="stochastic mean of 4", **later))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    mark_frontier(rows)
    return rows, outs, (x, src, tgt, mask)


def mark_frontier(rows):
    """``frontier``: no other row of the same (space, steps, editor) is at least as strong and as
    structured, and better in one."""
    for r in rows:
        same = [q for q in rows if (q["space"], q["steps"], q["editor"]) == (r["space"], r["steps"], r["editor"])]
        a, s = r["edit_strength"], r["structure"]
        r["frontier"] = not any(q["edit_strength"] >= a and q["structure"] >= s and
                                (q["edit_strength"] > a or q["structure"] > s) for q in same)


def best_at(pack, peer, within=0.02, ok=lambda q: True):
    """The row of ``pack`` in ``peer``'s space at no weaker edit (strength at most ``within`` below)
    that ``ok`` accepts and keeps the most structure, or None."""
    rows = [q for q in pack if q["space"] == peer["space"] and q["edit_strength"] >= peer["edit_strength"] - within
            and ok(q)]
    return max(rows, key=lambda q: q["structure"], default=None)


def compare(rows, steps=10, within=0.02, background=50.0):
    """Per space, each frontier point of an honest peer (inpainting, FlowEdit composited) against
    the pack's editors (not its FlowEdit weighing every step, nor the best-of-4 pick) that keep the
    background (at least ``background`` dB) at no weaker edit (strength at most ``within``
    below): the one keeping the most structure, and its structure, background, seam and calls
    beside the peer's."""
    out = []
    pack = [r for r in rows if r["editor"] in PACK and r["steps"] == steps and r["background_psnr"] >= background
            and r["editor"] not in ("flowedit region", "stochastic best of 4")]
    for r in rows:
        if r["steps"] != steps or r["editor"] not in ("inpaint", "inpaint_dd", "flowedit") or not r["frontier"]:
            continue
        best = best_at(pack, r, within)
        c = {"space": r["space"], "steps": steps, "peer": r["editor"], "peer_setting": r["setting"],
             "peer_cfg": r["cfg_edit"], **{f"peer_{k}": r[k] for k in ("edit_strength", "structure", "background_psnr",
                                                                        "seam_ratio", "nfe")}}
        if best is not None:
            c.update(pack=best["editor"], pack_setting=best["setting"], pack_cfg=best["cfg_edit"],
                     **{f"pack_{k}": best[k] for k in ("edit_strength", "structure", "background_psnr", "seam_ratio",
                                                       "nfe")})
            c["structure_gain"] = best["structure"] - r["structure"]
        out.append(c)
    return out


def gate(rows, steps=10, cfg=5.0):
    """Issue 23's gate, per space. For each FlowEdit setting at ``cfg`` (composited by the mask): the
    pack's rows at no weaker edit (strength at most 0.02 below) that keep the background (50 dB),
    show no seam (ratio at most 1.5) and cost at most twice its calls; the one keeping the most
    structure, and whether it keeps 0.05 more. For each inpainting + DifferentialDiffusion row:
    the pack's row keeping the most structure at no weaker edit, and whether it keeps 0.3 more."""
    pack = [r for r in rows if r["editor"] in PACK and r["steps"] == steps and r["editor"] != "stochastic best of 4"]
    out = []
    for r in rows:
        fe = r["editor"] == "flowedit" and r["cfg_edit"] == cfg
        if r["steps"] != steps or not (fe or r["editor"] == "inpaint_dd"):
            continue
        best = best_at(pack, r, ok=lambda q: not fe or (q["background_psnr"] >= 50 and q["seam_ratio"] <= 1.5 and
                                                        q["nfe"] <= 2 * r["nfe"]))
        need = 0.05 if fe else 0.3
        out.append({"space": r["space"], "peer": r, "pack": best, "need": need,
                    "met": best is not None and best["structure"] >= r["structure"] + need - 1e-9})
    return out


def gate_table(g):
    def cell(r):
        return (f"{r['editor']} ({', '.join(f'{a} {v:g}' for a, v in r['setting'].items())}, cfg {r['cfg_edit']:g}) | "
                f"{r['edit_strength']:.3f} / {r['structure']:.3f} / {r['background_psnr']:.1f} / "
                f"{r['seam_ratio']:.2f} / {r['nfe']}")
    out = ["| space | peer (setting) | strength / structure / background dB / seam / NFE | pack's best that may "
           "count (setting) | strength / structure / background dB / seam / NFE | structure gain (needed) | met |",
           "|---|---|---|---|---|---|---|"]
    for c in g:
        p = c["pack"]
        mine = "none | " if p is None else cell(p)
        gain = "" if p is None else f"{p['structure'] - c['peer']['structure']:+.3f}"
        out.append(f"| {c['space']} | {cell(c['peer'])} | {mine} | {gain} ({c['need']:+.2f}) | "
                   f"{'yes' if c['met'] else 'no'} |")
    return "\n".join(out) + "\n"


# -- reporting ------------------------------------------------------------------------

def fmt_setting(r):
    k = r["setting"]
    knob = ", ".join(f"{a} {v:g}" for a, v in k.items() if a != "cfg_edit")
    return f"{knob}, cfg {r['cfg_edit']:g}" if knob else f"cfg {r['cfg_edit']:g}"


def table(rows):
    """Markdown: per (space, steps) one table, every editor at every setting; frontier points marked."""
    out = []
    for s in dict.fromkeys(r["space"] for r in rows):
        for n in sorted(set(r["steps"] for r in rows if r["space"] == s)):
            here = [r for r in rows if r["space"] == s and r["steps"] == n]
            out.append(f"\n**{s.upper()}, {n} steps** (unedited source's strength {here[0]['source_strength']:.3f}; "
                       "F: on the editor's frontier of strength against structure)\n")
            out.append("| editor | setting | inversion | background dB / SSIM | strength | structure | seam ratio | "
                       "NFE | F |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in here:
                out.append(f"| {r['editor']} | {fmt_setting(r)} | {r['inversion'] or '-'} | "
                           f"{r['background_psnr']:.1f} / {r['background_ssim']:.3f} | {r['edit_strength']:.3f} | "
                           f"{r['structure']:.3f} | {r['seam_ratio']:.2f} | {r['nfe']} | "
                           f"{'F' if r['frontier'] else ''} |")
    return "\n".join(out) + "\n"


def summary(rows, steps=10, cfg=5.0):
    """Markdown: every editor at ``cfg`` and its middle knob, the spaces across (the README's table)."""
    spaces = list(dict.fromkeys(r["space"] for r in rows))
    names = [e for e in EDITORS if any(r["editor"] == e for r in rows)]
    out = ["| editor | setting | " + " | ".join(f"{s.upper()}: background dB / strength / structure / seam / NFE"
                                                for s in spaces) + " |", "|---|---|" + "---|" * len(spaces)]
    for e in names:
        k = middle(e, steps) or {"cfg_edit": cfg}
        cells = []
        for s in spaces:
            r = next((q for q in rows if q["space"] == s and q["steps"] == steps and q["editor"] == e and
                      q["cfg_edit"] == cfg and q["setting"] == k), None)
            cells.append("" if r is None else f"{r['background_psnr']:.1f} / {r['edit_strength']:.3f} / "
                                               f"{r['structure']:.3f} / {r['seam_ratio']:.2f} / {r['nfe']}")
        knob = ", ".join(f"{a} {v:g}" for a, v in k.items() if a != "cfg_edit") or "-"
        out.append(f"| {e} | {knob} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def compare_table(cmp):
    out = ["| space | peer (setting) | its strength / structure / background dB / seam / NFE | pack's best at no "
           "weaker edit (setting) | its strength / structure / background dB / seam / NFE | structure gain |",
           "|---|---|---|---|---|---|"]
    for c in cmp:
        peer = f"{c['peer']} ({', '.join(f'{a} {v:g}' for a, v in c['peer_setting'].items())}, cfg {c['peer_cfg']:g})"
        pv = (f"{c['peer_edit_strength']:.3f} / {c['peer_structure']:.3f} / {c['peer_background_psnr']:.1f} / "
              f"{c['peer_seam_ratio']:.2f} / {c['peer_nfe']}")
        if "pack" not in c:
            out.append(f"| {c['space']} | {peer} | {pv} | none as strong (within 0.02) | | |")
            continue
        pack = f"{c['pack']} ({', '.join(f'{a} {v:g}' for a, v in c['pack_setting'].items())}, cfg {c['pack_cfg']:g})"
        kv = (f"{c['pack_edit_strength']:.3f} / {c['pack_structure']:.3f} / {c['pack_background_psnr']:.1f} / "
              f"{c['pack_seam_ratio']:.2f} / {c['pack_nfe']}")
        out.append(f"| {c['space']} | {peer} | {pv} | {pack} | {kv} | {c['structure_gain']:+.3f} |")
    return "\n".join(out) + "\n"


FAMILIES = {  # one colour per family of editors; a marker and a line style per editor in it
    "peer": ("0.45", ("peer", "ddim+target")),
    "inpainting": ("tab:blue", ("inpaint", "inpaint_dd")),
    "FlowEdit": ("tab:green", ("flowedit", "flowedit whole", "flowedit region", "flowedit antithetic")),
    "blended": ("tab:orange", ("blended ddim", "blended aidi_anderson", "blended bdia", "blended edict")),
    "DirectInversion": ("tab:purple", ("direct", "direct whole")),
    "stochastic": ("tab:red", ("stochastic best of 4", "stochastic mean of 4")),
}


def style(editor):
    for colour, names in FAMILIES.values():
        if editor in names:
            k = names.index(editor)
            return dict(color=colour, marker="osD^"[k], ls=("-", "--", "-.", ":")[k])
    return dict(color="black", marker="x", ls="-")


def plot(rows, file, steps=10, cap=120.0):
    """Per space (columns) at ``steps``, three panels against edit strength: structure for the peers
    (top), structure for the pack's editors with the honest peers' frontiers pale
    behind them (middle), and background PSNR for all (bottom). Each editor's frontier of strength
    against structure is a line through its frontier points (the structure panels also show its
    other settings as faint markers). Background PSNR at or above ``cap`` dB (306 = bit for bit)
    is drawn hollow, in a lane of its own per editor above the cap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    spaces = list(dict.fromkeys(r["space"] for r in rows))
    names = [e for e in EDITORS if any(r["editor"] == e for r in rows)]
    peers = [e for e in names if e in PEERS or e == "flowedit region"]
    fig, axes = plt.subplots(3, len(spaces), figsize=(6.0 * len(spaces) + 3.2, 14.5), squeeze=False, sharex="col")

    def frontier(e, s):
        here = [r for r in rows if r["space"] == s and r["steps"] == steps and r["editor"] == e]
        return (sorted((r for r in here if r["frontier"]), key=lambda r: r["edit_strength"]),
                [r for r in here if not r["frontier"]])

    def structure(ax, e, s, pale=False):
        front, rest = frontier(e, s)
        st = style(e)
        if pale:
            ax.plot([r["edit_strength"] for r in front], [r["structure"] for r in front], color=st["color"],
                    lw=4, alpha=0.25, solid_capstyle="round")
            return
        ax.scatter([r["edit_strength"] for r in rest], [r["structure"] for r in rest], s=12, marker=st["marker"],
                   color=st["color"], alpha=0.3, linewidths=0)
        ax.plot([r["edit_strength"] for r in front], [r["structure"] for r in front], color=st["color"],
                marker=st["marker"], ls=st["ls"], ms=5, lw=1.4)

    for i, s in enumerate(spaces):
        top, mid, bottom = axes[0][i], axes[1][i], axes[2][i]
        for e in peers:
            if e != "flowedit whole":  # its region is flowedit's: the same points
                structure(top, e, s)
        for e in ("inpaint_dd", "flowedit"):
            if e in names:
                structure(mid, e, s, pale=True)
        for e in names:
            if e not in peers:
                structure(mid, e, s)
        lanes = [e for e in names if any(r["background_psnr"] >= cap for r in rows
                                         if r["space"] == s and r["steps"] == steps and r["editor"] == e)]
        for e in names:
            front, _ = frontier(e, s)
            if not front:
                continue
            st = style(e)
            lane = cap + 4 * (lanes.index(e) + 1) if e in lanes else None
            ys = [lane if r["background_psnr"] >= cap else r["background_psnr"] for r in front]
            capped = [r["background_psnr"] >= cap for r in front]
            bottom.plot([r["edit_strength"] for r in front], ys, color=st["color"], ls=st["ls"], lw=1.0)
            for r, y, c in zip(front, ys, capped):
                bottom.scatter([r["edit_strength"]], [y], s=24, marker=st["marker"], edgecolors=st["color"],
                               facecolors="none" if c else st["color"], linewidths=1.0, zorder=3)
        floor = next(r["source_strength"] for r in rows if r["space"] == s)
        for ax in (top, mid, bottom):
            ax.axvline(floor, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        for ax in (top, mid):
            ax.set_ylabel("structure kept in the region (source = 1)")
        top.set_title(f"{s.upper()}, {steps} steps: the peers' frontiers (faint: their other settings)", fontsize=10)
        mid.set_title(f"{s.upper()}, {steps} steps: the pack's editors (pale bands: FlowEdit's and\n"
                      "inpainting + DifferentialDiffusion's frontiers, from the panel above)", fontsize=10)
        bottom.set_title(f"{s.upper()}, {steps} steps: background kept at each frontier point", fontsize=10)
        bottom.axhline(cap + 2, color="grey", lw=0.6, ls=":")
        bottom.text(0.01, cap + 1, f"above: hollow, {cap:g} dB or more (306 = bit for bit), a lane per editor",
                    fontsize=7, color="0.35", va="top", transform=bottom.get_yaxis_transform())
        bottom.set_ylim(0, cap + 4 * (len(lanes) + 1) + 2)
        bottom.set_ylabel("background PSNR (dB)")
        bottom.set_xlabel("edit strength (target label's probability, region)")
    label = {"flowedit whole": "flowedit whole (region as flowedit's)", "flowedit region": "flowedit region (pack node)"}
    handles = [Line2D([], [], label=label.get(e, e), ms=6, **style(e)) for e in names]
    handles.append(Line2D([], [], color="grey", ls=":", label="unedited source's strength"))
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.03, 1.0),
                       title="editor (colour: family)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=90)
    plt.close(fig)


def grid(outs, originals, file, steps=10, cfg=5.0, scale=4):
    """Per space a block: the source, the region (right half lit), a patch of the target photo, each
    editor at cfg_edit 5 and its middle knob (denoise 1; FlowEdit n_max 8; seed 0)."""
    from PIL import Image, ImageDraw
    from .data import held_out
    from .reconstruction import label_font, strip
    x, src, tgt, mask = originals
    keys = [k for k in outs if k[1] == steps and k[2] == cfg and json.loads(k[4]) in
            (middle(k[3], steps), {"cfg_edit": cfg})]
    spaces = list(dict.fromkeys(k[0] for k in keys))
    names = [e for e in EDITORS if any(k[3] == e for k in keys)]
    region = x * (0.35 + 0.65 * mask)
    ex, _ = held_out(16)
    target = ex[8:16][tgt] if len(ex) >= 16 else ex[tgt]  # a second held-out patch of each target photo
    b, _, h, w = x.shape
    font = label_font()
    label_w, gap, head = 230, 10, 28
    cw, ch = (b * (w + 2) - 2) * scale, h * scale
    labels = ["source", "region (right half)", "target photo (example)"]
    labels += [f"{e} ({fmt_setting({'setting': middle(e, steps), 'cfg_edit': cfg}).split(', cfg')[0]})"
               if middle(e, steps) else e for e in names]
    img = Image.new("RGB", (label_w + len(spaces) * (cw + gap), head + len(labels) * (ch + 4)), "white")
    d = ImageDraw.Draw(img)
    for j, s in enumerate(spaces):
        x0 = label_w + j * (cw + gap)
        d.text((x0, 4), f"{s.upper()}, {steps} steps, cfg_edit {cfg:g}", fill="black", font=font)
        shown = [x, region, target] + [next(outs[k] for k in keys if k[0] == s and k[3] == e) for e in names]
        for i, t in enumerate(shown):
            img.paste(Image.fromarray(strip(t)).resize((cw, ch), Image.NEAREST), (x0, head + i * (ch + 4)))
    for i, c in enumerate(labels):
        d.text((4, head + i * (ch + 4) + ch // 2 - 7), c, fill="black", font=font)
    img.save(file)


def write(rows, outs, originals, out, meta):
    import torch
    from .reconstruction import _commit, _json_default
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                commit=_commit())
    steps = min(r["steps"] for r in rows)
    cmp, g = compare(rows, steps), gate(rows, steps)
    met = [{"space": c["space"], "peer": c["peer"]["editor"], "peer_setting": c["peer"]["setting"],
            "peer_cfg": c["peer"]["cfg_edit"], "pack": None if c["pack"] is None else c["pack"]["editor"],
            "pack_setting": None if c["pack"] is None else c["pack"]["setting"],
            "pack_cfg": None if c["pack"] is None else c["pack"]["cfg_edit"], "met": c["met"]}
           for c in g]
    (out / "editing.json").write_text(json.dumps({"meta": meta, "rows": rows, "comparisons": cmp, "gate": met},
                                                 indent=1, default=_json_default))
    md = ["# Edit benchmark", "", f"Command: `{meta['command']}`; wall time {meta['seconds']:.0f} s on "
          f"{meta['threads']} thread(s), torch {meta['torch']}, commit {meta['commit']}.", "",
          "8 held-out 16x16 photo patches, each edited from its photo's label to another's inside the right half; "
          "background = the left half. Seeded editors (inpaint, inpaint_dd and the three FlowEdit rows): means over seeds 0-3.",
          "", f"## Every editor at {steps} steps, cfg_edit 5, its middle knob", "", summary(rows, steps), "",
          "## Every setting", table(rows), f"## The honest peers' frontier points against the pack at {steps} steps", "",
          "For each frontier point of inpainting and of FlowEdit composited by the mask, the pack's "
          "editor (its FlowEdit weighing every step and the best of 4 left out) keeping the background at 50 dB "
          "or more that keeps the "
          "most structure at an edit strength at most 0.02 below.", "",
          compare_table(cmp), "", f"## Issue 23's gate at {steps} steps", "",
          "For each FlowEdit setting at cfg_edit 5 (composited by the mask): the pack's editor keeping the most "
          "structure among those at an edit strength at most 0.02 below, a background of 50 dB or more, a seam "
          "ratio of at most 1.5 and at most twice its calls; met where it keeps 0.05 more structure. For each "
          "inpainting + DifferentialDiffusion setting: the pack's editor keeping the most structure at an edit "
          "strength at most 0.02 below; met where it keeps 0.3 more.", "",
          gate_table(g)]
    (out / "editing.md").write_text("\n".join(md))
    plot(rows, out / "edit_tradeoff.png", steps=steps)
    grid(outs, originals, out / "edit_grid.png", steps=steps)


def main(argv=None):
    p = argparse.ArgumentParser(description="Edit benchmark on the bundled TinyUNet.")
    p.add_argument("--spaces", nargs="+", default=["eps", "flow"], choices=["eps", "flow"])
    p.add_argument("--steps", nargs="+", type=int, default=[10],
                   help="the whole sweep at the fewest, cfg_edit 5 (every knob) at the others")
    p.add_argument("--cfg", nargs="+", type=float, default=list(CFGS), help="cfg_edit values of the sweep")
    p.add_argument("--editors", nargs="+", default=list(EDITORS), choices=list(EDITORS))
    p.add_argument("--quick", action="store_true", help="cfg_edit 5 and each editor's middle knob only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=pathlib.Path, default=None)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "out")
    a = p.parse_args(argv)
    if a.quick:
        a.cfg = [5.0]
    import torch
    torch.set_num_threads(a.threads)
    weights = {s: a.weights / f"tinyunet_{s}.safetensors" for s in a.spaces} if a.weights else None
    t0 = time.perf_counter()
    rows, outs, originals = benchmark(a.spaces, a.steps, a.cfg, weights=weights, editors=a.editors, quick=a.quick)
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
