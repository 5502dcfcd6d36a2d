"""Ready for a GPU (issue 24): every inversion method on the host's real SD1.5, SDXL and Flux.

    COMFYUI_PATH=<ComfyUI checkout> python benchmarks/gpu_check.py --out gpu_check   # CUDA, at most 5 minutes
    COMFYUI_PATH=... python benchmarks/gpu_check.py --models flux --dtypes bf16 --methods ddim bdia edict
    COMFYUI_PATH=... python benchmarks/gpu_check.py --tiny --device cpu              # the tests' tiny models (pytest)
    COMFYUI_PATH=... python benchmarks/gpu_check.py --checkpoint sd15.safetensors --images photos/ --size 512

Models: each family is the host's own config class, ``model_base`` class and network. The
config is the one the host's model detection reads off the key layout of the published
checkpoint (``skeleton``: key names and shapes, no weights), so it is what a real
checkpoint builds on this host: SD1.5 (0.86 B weights), SDXL (2.57 B) and Flux.1-dev
(11.9 B). Weights are random (Gaussian, scaled by fan-in; norms 1, biases 0; the UNets'
output layer scaled down, ``OUTPUT``, so the random denoiser is smooth enough to invert), built
on the device in the dtype asked, and the network computes in it (no manual cast); the
solvers compute in float32 as always. Latents are SD-size: 1x4x128x128 (SD1.5, SDXL) and
1x16x128x128 (Flux), N(0, 1) in the model's space; prompts are random (77 tokens, Flux 256).

Per model x dtype x method, through the host's CFG guider (``nodes/host/run.guided``, as
the Invert node runs), at cfg 1 and the host's schedule (``normal``; ``simple`` for flow):
- ``rel``: the round trip, ``||reconstruct(invert(x)) - x|| / ||x||`` in the model's space
  (the worst item); BDIA and EDICT are exact up to rounding;
- ``calls_per_step``: the inversion's model calls per step (``nfe_rec``: the reconstruction's);
- ``solver_share``: the part of the inversion's wall time spent outside the model calls
  (each call is timed with the device synchronised before and after);
- ``peak_mib``: ``torch.cuda.max_memory_allocated`` over the round trip, and
  ``above_start_mib`` that less what was allocated before it (the weights, latent and prompt).
  On the CPU, the process's resident high-water mark, and that above the resident set at the
  start of the round trip (Linux; elsewhere None).

Time guard: ``--limit`` seconds for the whole run from the start of ``main``, the host's import
included (default 260, so a run with Python and torch starting stays under 5 minutes), shared out over the models and, within a model, over its dtypes (what one
leaves passes on). The exact methods run first, then the others by their most calls. A
method whose fewest calls (from the registry, times a call's measured time) do not fit in
what is left of its share is skipped; one still running at the end of its share is stopped
before its next model call. Either way its row says so.

``--checkpoint PATH --images DIR`` runs the reconstruction benchmark on real weights
instead: the host's loader (``comfy.sd.load_checkpoint_guess_config``), each image
centre-cropped and resized to ``--size``, VAE-encoded, inverted, reconstructed and
VAE-decoded; PSNR in pixels ([0, 1]) against the image, beside the VAE's own round trip
(encode then decode, the ceiling). The prompt is ``--prompt`` through the checkpoint's
text encoder, or a zeroed conditioning of the model's width where it has none.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import platform
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # pack.py, as a sibling (benchmarks/run.py)

DTYPES = ("fp32", "fp16", "bf16")
FAMILIES = ("sd15", "sdxl", "flux")
# Each family's output layer and the gain of its random weights: a random UNet's eps is too steep in x to
# invert (its GroupNorms), so it is scaled down; on the tiny models DDIM then round-trips to 0.1-0.3, as
# a trained model does at 10 steps.
OUTPUT = {"sd15": ("out.2.weight", 0.1), "sdxl": ("out.2.weight", 0.1), "flux": ("final_layer.linear.weight", 1.0)}
MIB = 2 ** 20


def host():
    """The ComfyUI checkout: COMFYUI_PATH, or the custom_nodes/ folder this pack sits in (as the tests find it)."""
    from pack import comfyui
    where = comfyui()
    if where is None or not (where / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (its requirements installed in this interpreter)")
    return where


def setup(device: str):
    """The host on sys.path in the mode ``device`` asks, and the pack loaded as ``inversion_suite``."""
    where = str(host())
    if where not in sys.path:
        sys.path.insert(0, where)
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = device == "cpu"  # read once, when model_management is first imported
    import comfy.model_management
    from pack import load
    load()
    got = comfy.model_management.get_torch_device()
    if torch.device(device).type != got.type:
        sys.exit(f"--device {device}: the host already runs on {got} in this process")
    return got


def dtype_of(name):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# -- models ---------------------------------------------------------------------------

def skeleton(family):
    """The key layout of the family's published checkpoint (names and shapes the host's detection
    reads, on the meta device): SD1.5 and SDXL in diffusers layout, Flux.1-dev in its own."""

    def m(*shape):
        return torch.empty(shape, device="meta")
    if family == "flux":  # 19 double and 38 single blocks of width 3072; T5 (4096) and CLIP-L (768) inputs
        sd = {"img_in.weight": m(3072, 64), "txt_in.weight": m(3072, 4096), "vector_in.in_layer.weight": m(3072, 768),
              "guidance_in.in_layer.weight": m(3072, 256)}
        sd.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": m(128) for i in range(19)})
        sd.update({f"single_blocks.{i}.norm.key_norm.scale": m(128) for i in range(38)})
        return sd
    # (channels, transformer blocks per attention) of each down block; 2 resnets each
    levels, context = ([(320, 1), (640, 1), (1280, 1), (1280, 0)], 768) if family == "sd15" else \
        ([(320, 0), (640, 2), (1280, 10)], 2048)
    sd = {"conv_in.weight": m(320, 4, 3, 3)}
    if family == "sdxl":
        sd["add_embedding.linear_1.weight"] = m(1280, 2816)  # pooled CLIP-G (1280) + 6 size embeddings of 256
    for i, (ch, depth) in enumerate(levels):
        for r in range(2):
            sd[f"down_blocks.{i}.resnets.{r}.conv1.weight"] = m(ch, ch, 3, 3)
            for t in range(depth):
                sd[f"down_blocks.{i}.attentions.{r}.transformer_blocks.{t}.attn2.to_k.weight"] = m(ch, context)
    return sd


def model_config(family, tiny=False):
    """The host's supported_models config of ``family``: detected from its skeleton, or (``tiny``)
    the tests' tiny configuration of the same class (``tests/comfy_host.py``)."""
    import comfy.model_detection
    import comfy.supported_models
    if tiny:
        from inversion_suite.tests import comfy_host as ch
        return {"sd15": lambda: comfy.supported_models.SD15(dict(ch.UNET)),
                "sdxl": lambda: comfy.supported_models.SDXL(dict(ch.SDXL_UNET)),
                "flux": lambda: comfy.supported_models.Flux(ch.flux_config())}[family]()
    sd = skeleton(family)
    if family == "flux":
        config = comfy.model_detection.model_config_from_unet(sd, "")
    else:
        unet = comfy.model_detection.unet_config_from_diffusers_unet(sd)
        config = unet and comfy.model_detection.model_config_from_unet_config(unet)
    want = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux"}[family]
    if type(config).__name__ != want:
        raise RuntimeError(f"the host detected {type(config).__name__} from the {want} key layout")
    return config


def randomise(net, seed, out=None, out_gain=1.0):
    """Gaussian weights of std 1/sqrt(fan-in), drawn in float32 on the weights' device and rounded
    to their dtype (so every dtype gets the same network); norms 1, biases 0; the output layer's
    weight ``out`` (default: the last matrix registered) times ``out_gain``."""
    params = dict(net.named_parameters())
    out = out or [n for n, p in params.items() if p.ndim > 1][-1]
    if out not in params:
        raise KeyError(f"no weight {out!r} in {type(net).__name__}")
    g = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                std = (out_gain if name == out else 1.0) / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)


def build(family, dtype, device, tiny=False, seed=0):
    """A ModelPatcher of the family's host model, built on ``device`` with ``dtype`` weights."""
    import comfy.model_patcher
    config = model_config(family, tiny)
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, "", device=device)
    randomise(base.diffusion_model, seed, *OUTPUT[family])
    base.eval()
    # Offloading to the device itself: the host never moves these weights between runs.
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def conditioning(config, seed=0, tokens=77, zero=False):
    """A CONDITIONING of the model's widths: context tokens, and the pooled vector SDXL and Flux read."""
    u = config.unet_config
    width = u.get("context_in_dim") or u["context_dim"]
    pooled = u.get("vec_in_dim") or ((u["adm_in_channels"] - 6 * 256) if u.get("adm_in_channels") else None)
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *s: torch.zeros(s)) if zero else (lambda *s: torch.randn(s, generator=g))
    return [[draw(1, tokens, width), {"pooled_output": draw(1, pooled)} if pooled else {}]]


def free():
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- measuring ------------------------------------------------------------------------

class OutOfTime(Exception):
    """A run reached the end of its share of --limit."""


class Clock:
    """The host's denoiser, counted and timed; on CUDA it synchronises around each call, so the
    solver's queued work counts outside the model and the model's own inside. Past ``deadline``
    (perf_counter seconds) it refuses the next call."""

    def __init__(self, den, device, deadline=math.inf):
        self.den, self.calls, self.seconds, self.deadline = den, 0, 0.0, deadline
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, x, sigma):
        if time.perf_counter() > self.deadline:
            raise OutOfTime(f"stopped at the end of its time share, after {self.calls} model calls")
        self.sync()
        t = time.perf_counter()
        out = self.den(x, sigma)
        self.sync()
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def span(self, fn):
        """``fn()``'s result, wall seconds, seconds in model calls, and model calls."""
        c, s = self.calls, self.seconds
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t, self.seconds - s, self.calls - c


class Peak:
    """Peak memory over a span: CUDA's allocator, or on the CPU the resident high-water mark (Linux)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.top = self.base = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                from inversion_suite.benchmarks.memory import status
                self.base = status("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the high-water mark restarts at the present resident set
            except (OSError, RuntimeError):
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.top = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            from inversion_suite.benchmarks.memory import status
            self.top = status("VmHWM")
        return False

    def row(self):
        if self.top is None:
            return {"peak_mib": None, "above_start_mib": None, "memory": None}
        kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "resident high-water mark (VmHWM)"
        return {"peak_mib": self.top / MIB, "above_start_mib": max(0, self.top - self.base) / MIB, "memory": kind}


def roundtrip(model, samples, positive, method, steps, scheduler, cfg, device, deadline=math.inf, **settings):
    """Invert ``samples`` (a LATENT's, VAE scale) with ``method`` and sample back, through the host's
    guider as the Invert node does; no model call starts after ``deadline``. Returns (row,
    reconstruction in VAE scale)."""
    from inversion_suite.nodes.host.model import space_of
    from inversion_suite.nodes.host.run import guided, sigmas_for
    from inversion_suite.solvers import METHODS, invert, metrics, reconstruct
    space = space_of(model, "gpu_check")
    sigmas = sigmas_for(model, scheduler, steps, 1.0)

    def job(den, x, inner):
        clock = Clock(den, device, deadline)
        inv, t_inv, m_inv, n_inv = clock.span(lambda: invert(method, clock, x, sigmas, space=space, **settings))
        back, t_rec, m_rec, n_rec = clock.span(lambda: reconstruct(clock, inv))
        if n_inv != inv.nfe:
            raise RuntimeError(f"{method}: the model saw {n_inv} calls, the inversion says {inv.nfe}")
        row = {"rel": float(metrics.rel_error(x, back).max()), "nfe": n_inv, "calls_per_step": n_inv / steps,
               "nfe_rec": n_rec, "nfe_rec_expected": METHODS[method].resumer.calls(len(inv.sigmas) - 1),
               "inverted_steps": len(inv.sigmas) - 1,
               "seconds": t_inv, "model_seconds": m_inv, "solver_share": max(0.0, t_inv - m_inv) / max(t_inv, 1e-12),
               "ms_per_step": 1e3 * t_inv / steps, "ms_per_call": 1e3 * m_inv / max(n_inv, 1),
               "seconds_rec": t_rec, "solver_share_rec": max(0.0, t_rec - m_rec) / max(t_rec, 1e-12),
               "unconverged": len(inv.unconverged), "space": space}
        return row, back

    with Peak(device) as peak:
        row, out = guided("gpu_check", model, positive, None, cfg, samples, sigmas, job)
    return dict(row, **peak.row()), out


def call_seconds(model, samples, positive, cfg, scheduler, device):
    """Seconds of one model call through the guider, after a first (warm-up) call."""
    from inversion_suite.nodes.host.run import guided, sigmas_for
    sigmas = sigmas_for(model, scheduler, 2, 1.0)

    def job(den, x, inner):
        clock = Clock(den, device)
        s = x.new_full((x.shape[0],), float(sigmas[1]))
        clock(x, s)
        clock.seconds = 0.0
        clock(x, s)
        return clock.seconds, x
    return guided("gpu_check", model, positive, None, cfg, samples, sigmas, job)[0]


def calls(method, steps):
    """(fewest, most) model calls of a round trip of ``method`` at its defaults, from the registry:
    per step its sampler's calls, or at most its call budget (``iterations``, ``first_iterations``),
    plus one; sampling back takes the sampler's calls, or one per step the inversion ended with
    (a split step adds one, and each costs a call: at most as many as the inversion made)."""
    from inversion_suite.solvers import METHODS
    m = METHODS[method]
    back = m.resumer.calls(steps)
    per = max([m.resumer.per_step] + [m.settings[k].default for k in ("iterations", "first_iterations")
                                      if k in m.settings])
    return m.resumer.per_step * steps + back, per * steps + 1 + max(back, per * steps + 1)


def order(methods, steps):
    """The order runs are tried in, so a short time share still measures what matters most: the exact
    methods (those resumed from a pair of states) first, then by their most calls, fewest first."""
    from inversion_suite.solvers import METHODS
    return sorted(methods, key=lambda m: (METHODS[m].resumer.states != 2, calls(m, steps)[1]))


# -- the runs -------------------------------------------------------------------------

def check(a, device, start):
    """Every model x dtype x method on random-weight models; a row of measurements, or of why not, for each.

    Time guard: each model gets an equal part of what is left of ``--limit`` seconds after ``start``,
    each of its dtypes an equal part of the model's (unused time passes on). A method whose fewest
    calls do not fit in what is left is skipped; one that reaches the end of the share is stopped
    (no call starts after it).
    """
    from inversion_suite.nodes.host.model import space_of
    rows = []
    side = a.latent or (16 if a.tiny else 128)
    for fi, family in enumerate(a.models):
        model_end = time.perf_counter() + (a.limit - (time.perf_counter() - start)) / (len(a.models) - fi)
        for di, dname in enumerate(a.dtypes):
            end = time.perf_counter() + (model_end - time.perf_counter()) / (len(a.dtypes) - di)
            head = {"model": family, "dtype": dname, "steps": a.steps, "cfg": a.cfg}

            def skip(methods, why):
                rows.extend(dict(head, method=m, skipped=why) for m in methods)
            if end - time.perf_counter() < 0.5:
                skip(a.methods, "time: no share of --limit left")
                continue
            model = None
            try:
                t0 = time.perf_counter()
                model = build(family, dtype_of(dname), device, a.tiny, seed=a.seed)
                built = time.perf_counter() - t0
                channels = model.model.latent_format.latent_channels
                x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(a.seed))
                samples = model.model.process_latent_out(x)
                tokens = 16 if a.tiny else 256 if family == "flux" else 77
                positive = conditioning(model.model.model_config, a.seed, tokens)
                scheduler = a.scheduler or ("simple" if space_of(model, "gpu_check") == "flow" else "normal")
                per_call = call_seconds(model, samples, positive, a.cfg, scheduler, device)
            except Exception as e:  # out of memory, say: reported in every row of this model and dtype
                skip(a.methods, f"error building or warming up: {type(e).__name__}: {str(e)[:300]}")
                model = None  # its weights go before the next dtype's are built
                free()
                continue
            head.update(shape=list(x.shape), scheduler=scheduler, model_class=type(model.model).__name__,
                        params=sum(p.numel() for p in model.model.diffusion_model.parameters()),
                        build_seconds=built, call_ms=1e3 * per_call)
            for method in order(a.methods, a.steps):
                least = calls(method, a.steps)[0]
                left = end - time.perf_counter()
                if least * per_call > left:
                    skip([method], f"time: at least {least} calls, about {least * per_call:.1f} s; "
                                   f"{max(left, 0):.1f} s of this model and dtype's share left")
                    continue
                try:
                    row, _ = roundtrip(model, samples, positive, method, a.steps, scheduler, a.cfg, device, end)
                    rows.append(dict(head, method=method, **row))
                except OutOfTime as e:
                    rows.append(dict(head, method=method, skipped=f"time: {e}"))
                except Exception as e:  # reported in the row (non-finite output, out of memory, ...)
                    rows.append(dict(head, method=method, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    free()
                if not a.quiet:
                    print(line(rows[-1]), flush=True)
            model = None
            free()
    asked = [(f, d, m) for f in a.models for d in a.dtypes for m in a.methods]
    return sorted(rows, key=lambda r: asked.index((r["model"], r["dtype"], r["method"])))


def load_images(folder, size):
    """Every image in ``folder``, centre-cropped square and resized to ``size``:
    (names, (B, size, size, 3) in [0, 1])."""
    import numpy as np
    from PIL import Image
    names, out = [], []
    for p in sorted(pathlib.Path(folder).iterdir()):
        if p.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            continue
        im = Image.open(p).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
        names.append(p.name)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    if not out:
        sys.exit(f"--images {folder}: no .png, .jpg, .jpeg, .webp or .bmp files")
    return names, torch.stack(out)


@torch.no_grad()  # as the host's executor runs nodes: the VAE keeps no graph
def checkpoint(a, device):
    """The reconstruction benchmark on real weights: load, encode, invert, reconstruct, decode, PSNR."""
    import comfy.sd
    from inversion_suite.nodes.host.model import space_of
    from inversion_suite.solvers import metrics
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(a.checkpoint), output_vae=True, output_clip=True)
    if vae is None:
        sys.exit(f"--checkpoint {a.checkpoint}: the checkpoint holds no VAE")
    if clip is not None:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(a.prompt))
        prompt = a.prompt
    else:
        positive = conditioning(model.model.model_config, zero=True)
        prompt = "none: no text encoder in the checkpoint, a zeroed conditioning"
    scheduler = a.scheduler or ("simple" if space_of(model, "gpu_check") == "flow" else "normal")
    names, pixels = load_images(a.images, a.size)
    head = {"checkpoint": pathlib.Path(a.checkpoint).name, "model_class": type(model.model).__name__,
            "config": type(model.model.model_config).__name__,
            "dtype": str(model.model.get_dtype()).replace("torch.", ""), "steps": a.steps, "cfg": a.cfg,
            "scheduler": scheduler, "prompt": prompt}
    rows = []
    for name, px in zip(names, pixels):
        px = px[None]
        samples = vae.encode(px)
        ref = px.permute(0, 3, 1, 2)
        vae_db = float(metrics.psnr(ref, vae.decode(samples).permute(0, 3, 1, 2).float(), 1.0).mean())
        for method in a.methods:
            base = dict(head, image=name, method=method, size=a.size, shape=list(samples.shape), vae_psnr=vae_db)
            try:
                row, out = roundtrip(model, samples, positive, method, a.steps, scheduler, a.cfg, device)
                img = vae.decode(out).permute(0, 3, 1, 2).float()
                rows.append(dict(base, **row, psnr=float(metrics.psnr(ref, img, 1.0).mean())))
            except Exception as e:  # reported in the row
                rows.append(dict(base, error=f"{type(e).__name__}: {str(e)[:300]}"))
            if not a.quiet:
                print(line(rows[-1]), flush=True)
    return rows


# -- reporting ------------------------------------------------------------------------

def _g(v, fmt):
    return "" if v is None else fmt.format(v)


def line(r):
    """One Markdown row of the check (or, with an image, of the checkpoint benchmark)."""
    note = r.get("skipped") or r.get("error") or (f"{r['unconverged']} unconverged steps" if r.get("unconverged") else "")
    if "image" in r:
        return (f"| {r['image']} | {r['method']} | {_g(r.get('psnr'), '{:.2f}')} | {r['vae_psnr']:.2f} | "
                f"{_g(r.get('rel'), '{:.1e}')} | {_g(r.get('calls_per_step'), '{:.1f}')} | "
                f"{_g(r.get('solver_share') and 100 * r['solver_share'], '{:.1f}%')} | "
                f"{_g(r.get('peak_mib'), '{:.0f}')} | {note} |")
    share = r.get("solver_share")
    return (f"| {r['model']} | {r['dtype']} | {r['method']} | {_g(r.get('rel'), '{:.1e}')} | "
            f"{_g(r.get('calls_per_step'), '{:.1f}')} | {_g(r.get('nfe_rec'), '{}')} | "
            f"{'' if share is None else f'{100 * share:.1f}%'} | {_g(r.get('ms_per_step'), '{:.1f}')} | "
            f"{_g(r.get('peak_mib'), '{:.0f}')} | {_g(r.get('above_start_mib'), '{:.0f}')} | {note} |")


HEAD = ("| model | dtype | method | round trip | calls / step | sampling calls | solver share | ms / step | "
        "peak MiB | above start MiB | note |\n|---|---|---|---|---|---|---|---|---|---|---|")
IMAGE_HEAD = ("| image | method | PSNR dB | VAE alone dB | latent round trip | calls / step | solver share | "
              "peak MiB | note |\n|---|---|---|---|---|---|---|---|---|")


def exact_summary(rows):
    """The exact methods' worst round trip per dtype: how far half precision takes them from exact."""
    out = []
    for d in dict.fromkeys(r["dtype"] for r in rows):
        for m in ("bdia", "edict"):
            got = [(r["rel"], r["model"]) for r in rows if r["dtype"] == d and r["method"] == m and "rel" in r]
            if got:
                v, where = max(got)
                out.append(f"- {m} in {d}: worst round trip {v:.1e} ({where}, over {len(got)} model(s))")
    return out


def markdown(rows, meta):
    if meta["mode"] == "checkpoint":
        intro = (f"Checkpoint `{meta['checkpoint']}` through the host's loader, images of {meta['size']} px, "
                 f"{meta['steps']} steps, cfg {meta['cfg']:g}; PSNR in pixels against the image.")
        return "\n".join(["# Reconstruction on real weights", "", intro, "", meta["line"], "", IMAGE_HEAD,
                          *map(line, rows), ""])
    skipped = [r for r in rows if r.get("skipped")]
    body = ["# GPU check", "", meta["line"], "",
            "Round trip: ||reconstruct(invert(x)) - x|| / ||x|| in the model's space. Calls / step: the "
            "inversion's; sampling calls: the reconstruction's, in all. Solver share: the inversion's wall "
            "time outside model calls. Peak: " + ("CUDA max_memory_allocated." if meta["device"].startswith("cuda")
                                                  else "the process's resident high-water mark (CPU)."),
            "", HEAD, *map(line, rows), "", "Exact methods:", *(exact_summary(rows) or ["- none run"])]
    if skipped:
        body += ["", f"{len(skipped)} run(s) skipped; see the note column."]
    return "\n".join(body) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="Every inversion method on the host's SD1.5, SDXL and Flux at SD-size "
                                            "latents in fp32, fp16 and bf16; or, with --checkpoint and --images, "
                                            "the reconstruction benchmark on real weights.")
    p.add_argument("--device", default=None, help="cuda (the default where available) or cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=None, help="registry methods (default: all)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=DTYPES)
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--scheduler", default=None, help="host scheduler (default: normal; simple for flow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny host models and 16x16 latents (CPU test)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 128, SD-size; --tiny: 16)")
    p.add_argument("--limit", type=float, default=260.0,
                   help="seconds for the whole check from the start of main, shared out over models and dtypes "
                        "(default 260: with Python and torch starting, under 5 minutes)")
    p.add_argument("--checkpoint", type=pathlib.Path, default=None, help="a checkpoint the host's loader reads")
    p.add_argument("--images", type=pathlib.Path, default=None, help="a folder of images (with --checkpoint)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (with --checkpoint)")
    p.add_argument("--prompt", default="", help="the prompt, where the checkpoint has a text encoder")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "out" / "gpu_check")
    p.add_argument("--quiet", action="store_true", help="print only the table at the end (default: a line as each "
                                                        "model is built and each row is measured)")
    a = p.parse_args(argv)
    if (a.checkpoint is None) != (a.images is None):
        p.error("--checkpoint and --images go together")
    if a.steps < 2:
        p.error("--steps: at least 2 (BDIA resumes from the state one step before the end)")
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if not a.quiet:  # progress from the first second: the host's import alone takes several
        print(f"gpu_check: loading ComfyUI and the pack for {a.device} ...", flush=True)
    device = setup(a.device)
    from inversion_suite.solvers import METHODS
    a.methods = a.methods or list(METHODS)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"device": str(device), "device_name": name, "torch": torch.__version__, "steps": a.steps, "cfg": a.cfg,
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        import comfyui_version
        meta["comfyui"] = comfyui_version.__version__
    except ImportError:
        meta["comfyui"] = None
    if a.checkpoint:
        meta.update(mode="checkpoint", checkpoint=a.checkpoint.name, size=a.size)
        rows = checkpoint(a, device)
    else:
        meta.update(mode="tiny" if a.tiny else "check", models=a.models, dtypes=a.dtypes, limit=a.limit)
        rows = check(a, device, t0)
    meta["seconds"] = time.perf_counter() - t0
    meta["line"] = (f"`{meta['command'].strip()}` on {name} ({meta['device']}), torch {meta['torch']}, ComfyUI "
                    f"{meta['comfyui']}: {meta['seconds']:.0f} s.")
    md = markdown(rows, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (a.out / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {a.out}/gpu_check.json and gpu_check.md in {meta['seconds']:.0f} s")
    return {"meta": meta, "rows": rows, "markdown": md}


if __name__ == "__main__":
    main()
