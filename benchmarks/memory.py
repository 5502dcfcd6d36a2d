"""Peak memory of the Invert node above idle, through the real ComfyUI host, on CPU.

    COMFYUI_PATH=<ComfyUI checkout> python benchmarks/memory.py
    COMFYUI_PATH=... python benchmarks/memory.py --methods aidi_anderson ddim bdia --steps 10 20 --carry 0 1 2 8
    COMFYUI_PATH=... python benchmarks/memory.py --tol 1e-7   # longer steps: every buffer in use

Needs ComfyUI (its requirements in this interpreter). The model is the host's own, with a
video latent format (Wan 2.1: 16 channels, B,C,T,H,W) and its network replaced through the
unet function wrapper by the exact denoiser of Gaussian data (one multiply, so the
network's own memory does not hide Invert's). The latent is Wan-480p-sized by default,
1x16x13x60x104 (49 frames at 832x480).

Each measurement runs in a fresh process: after the model, latent and prompts exist and a
small warm-up inversion has run, the resident set is read (idle), the kernel's high-water
mark is reset (/proc/self/clear_refs), Invert runs, and the high-water mark is read again.
glibc's mmap threshold is pinned so freed latents go back to the system at once. Linux only.
Printed per run: one latent's size, the record's new tensors (the input latent is part of
idle), the peak above idle, and that peak minus the record, in latents.
"""

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
MIB = 2 ** 20


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(method, steps, shape, carry, pack, tol=None, check=True):
    host = os.environ.get("COMFYUI_PATH")
    if not host:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from pack import load

    load(pack)
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from inversion_suite.nodes.invert import Invert

    torch.set_num_threads(2)
    unet = {"image_size": 32, "in_channels": 16, "out_channels": 16, "model_channels": 32, "num_res_blocks": [1, 1],
            "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1, "context_dim": 32, "use_spatial_transformer": True,
            "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
            "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32}
    config = comfy.supported_models.SD15(unet)
    config.sampling_settings["shift"] = 3.0
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.FLOW, device=torch.device("cpu"))
    base.latent_format = comfy.latent_formats.Wan21()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    var = 0.5  # data ~ N(0, var): E[x0 | x] = (1 - s) var x / ((1 - s)^2 var + s^2) in flow space

    def gaussian(apply_model, args):
        s = args["timestep"].view(-1, *[1] * (args["input"].ndim - 1)).to(args["input"].dtype)
        return args["input"] * ((1 - s) * var / ((1 - s) ** 2 * var + s * s))

    model.set_model_unet_function_wrapper(gaussian)
    positive = [[torch.ones(1, 77, 32), {}]]
    extra = {"carry": carry} if method == "aidi_anderson" else {}
    if tol is not None and method in ("aidi_anderson", "fixed_point", "aidi_empirical"):
        extra["tol"] = tol  # a tighter tol makes steps take more calls, and more of the method's buffers

    def run(latent):
        return Invert.execute(model=model, latent=latent, positive=positive, method=method, steps=steps,
                              scheduler="simple", cfg=1.0, denoise=1.0, keep_trajectory=True, measure=check,
                              **extra).result[0]

    g = torch.Generator().manual_seed(0)
    small = {"samples": base.process_latent_out(var ** 0.5 * torch.randn(1, 16, 2, 8, 8, generator=g))}
    run(small)  # warm-up: lazy imports and first-call allocations
    latent = {"samples": base.process_latent_out(var ** 0.5 * torch.randn(shape, generator=g))}
    del small
    gc.collect()
    idle = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    out = run(latent)
    peak = status("VmHWM") - idle
    seen, new = set(), 0
    rec = out["inversion"]
    for t in [out["samples"], rec["pair"], rec["source"], rec["samples"], *(rec["trajectory"] or [])]:
        if isinstance(t, torch.Tensor) and id(t) not in seen and t is not latent["samples"]:
            seen.add(id(t))
            new += t.untyped_storage().nbytes()
    one = latent["samples"].numel() * 4
    return {"method": method, "steps": steps, "carry": carry if method == "aidi_anderson" else None,
            "latent_mib": one / MIB, "record_mib": new / MIB, "peak_mib": peak / MIB,
            "beyond_record_latents": (peak - new) / one, "nfe": rec["nfe"]}


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory of Invert above idle on a Wan-480p-sized latent.")
    p.add_argument("--methods", nargs="+", default=["aidi_anderson"])
    p.add_argument("--steps", nargs="+", type=int, default=[10])
    p.add_argument("--carry", nargs="+", type=int, default=[0], help="aidi_anderson's carry values to run (its default: 0)")
    p.add_argument("--shape", nargs="+", type=int, default=[1, 16, 13, 60, 104])
    p.add_argument("--tol", type=float, default=None, help="tol of the fixed-point methods (default: theirs)")
    p.add_argument("--pack", type=pathlib.Path, default=HERE.parent, help="the pack to measure (default: this one)")
    p.add_argument("--no-measure", action="store_true", help="turn Invert's round-trip measurement off")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.methods[0], a.steps[0], tuple(a.shape), a.carry[0], a.pack, a.tol, not a.no_measure)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_WAIT_POLICY="PASSIVE")
    print(f"latent {'x'.join(map(str, a.shape))}, float32, CPU; peak = high-water mark above idle"
          + (f"; tol {a.tol:g}" if a.tol is not None else "") + ("; measure off" if a.no_measure else ""))
    print("| method | carry | steps | NFE | one latent MiB | record MiB | peak MiB | peak - record, latents |")
    print("|---|---|---|---|---|---|---|---|")
    for method in a.methods:
        for steps in a.steps:
            for carry in (a.carry if method == "aidi_anderson" else [0]):
                cmd = [sys.executable, __file__, "--child", "--methods", method, "--steps", str(steps), "--carry",
                       str(carry), "--pack", str(a.pack), "--shape", *map(str, a.shape)]
                cmd += ["--tol", str(a.tol)] if a.tol is not None else []
                cmd += ["--no-measure"] if a.no_measure else []
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {method} | {r['carry'] if r['carry'] is not None else '-'} | {steps} | {r['nfe']} | "
                      f"{r['latent_mib']:.2f} | {r['record_mib']:.1f} | {r['peak_mib']:.1f} | "
                      f"{r['beyond_record_latents']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
