"""The real ComfyUI host for node tests, and tiny real models built in the test.

The host is found through ``COMFYUI_PATH`` or the ``custom_nodes/`` layout; where neither
holds, the tests that need it skip with one reason. Models are the host's own
``BaseModel`` (an SD1.5-style UNet shrunk to a few thousand weights) wrapped in the real
``ModelPatcher``, so conditioning, guidance, patches and model sampling are all the host's.
"""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from inversion_suite.benchmarks import pack

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP = ("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (its requirements installed in this "
        "interpreter) or install the pack under ComfyUI/custom_nodes/ to run the node tests")


def path():
    return pack.comfyui(ROOT)


def require():
    """Put the host on sys.path (CPU mode) or skip the calling test module."""
    where = path()
    if where is None or not (where / "comfy").is_dir():
        pytest.skip(SKIP, allow_module_level=True)
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    import comfy.cli_args  # noqa: E402  (before comfy.model_management is first imported)

    comfy.cli_args.args.cpu = True
    import torch

    torch.set_num_threads(1)  # tiny models run far faster single-threaded
    return where


require()

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import torch  # noqa: E402
from inversion_suite.nodes.invert import Invert  # noqa: E402
from inversion_suite.nodes.reconstruct import Reconstruct  # noqa: E402

CONTEXT = 32
UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": CONTEXT, "use_spatial_transformer": True,
    "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
}
TYPES = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
         "flow": comfy.model_base.ModelType.FLOW}


def tiny_model(kind="eps", seed=0):
    """A real host model with a tiny UNet (comfy.ops leaves weights uninitialised: ``patched`` fills them)."""
    config = comfy.supported_models.SD15(dict(UNET))
    if kind == "flow":
        config.sampling_settings["shift"] = 3.0
    return patched(comfy.model_base.BaseModel(config, model_type=TYPES[kind], device=torch.device("cpu")), seed, 0.05)


def run_invert(model, latent, positive, method="bdia", steps=3, scheduler="karras", cfg=1.0, denoise=1.0,
               keep_trajectory=True, **inputs):
    """Invert's output LATENT, the node called as the executor calls it."""
    return Invert.execute(model=model, latent=latent, positive=positive, method=method, steps=steps, scheduler=scheduler,
                          cfg=cfg, denoise=denoise, keep_trajectory=keep_trajectory, **inputs).result[0]


def run_reconstruct(model, inverted, positive, cfg=-1.0, negative=None):
    """Reconstruct's output LATENT."""
    return Reconstruct.execute(model=model, inverted=inverted, positive=positive, cfg=cfg, negative=negative).result[0]


def patched(model, seed, std):
    """Fill the weights (zero biases, unit norms, Gaussian matrices) and wrap in the real patcher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else
                    torch.ones_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=g) * std)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def prompt(label, batch=1, tokens=77):
    """A CONDITIONING whose tensor encodes ``label`` (read back by ``exact_model``)."""
    return [[torch.full((batch, tokens, CONTEXT), float(label + 1)), {}]]


def exact_model(kind, mixture, seed=0):
    """A tiny host model whose network is replaced by the exact mixture denoiser.

    The unet function wrapper receives the raw state and sigma and returns x0 (it stands
    in for ``apply_model``), so the host's guidance, batching and patcher stay real.
    A zeroed conditioning is the unconditional branch; ``prompt(k)`` selects component k.
    """
    return with_mixture(tiny_model(kind, seed), mixture, "flow" if kind == "flow" else "eps")


def with_mixture(model, mixture, space):
    """A clone of ``model`` whose network is the exact ``mixture`` denoiser in ``space``: the
    conditioning's mean, rounded, less one, selects a component (-1, a zeroed prompt: all)."""
    m = model.clone()

    def wrapper(apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]["c_crossattn"]
        label = c.flatten(1).mean(1).round().long() - 1
        mask = torch.zeros(x.shape[0], len(mixture.mu), dtype=torch.bool)
        mask[label >= 0, label[label >= 0]] = True
        mask[label < 0] = True
        return mixture.denoise(x, sigma, space, mask)

    m.set_model_unet_function_wrapper(wrapper)
    return m


def vae_scale(model, x):
    """A model-space latent as a LATENT holds it."""
    return model.model.process_latent_out(x)


FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": CONTEXT, "context_in_dim": CONTEXT,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False}


def flux_config(**extra):
    """FLUX plus the fields this host's ``FluxParams`` requires (``txt_ids_dims`` since ComfyUI 0.4: none for Flux.1)."""
    import dataclasses

    import comfy.ldm.flux.model

    config = dict(FLUX, **extra)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        config.setdefault("txt_ids_dims", [])
    return config


def tiny_flux(seed=0, std=0.2):
    """The host's Flux (joint [text, image] attention, flow sampling) with a tiny transformer."""
    return patched(comfy.model_base.Flux(comfy.supported_models.Flux(flux_config()), device=torch.device("cpu")), seed, std)


def executor(server):
    """The host's ``PromptExecutor`` with the classic cache (newer hosts also need ``cache_args``)."""
    import inspect

    import execution

    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}  # what --cache-classic passes
    return execution.PromptExecutor(server, **kwargs)


def flux_prompt(seed, tokens=16):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT, generator=g), {"pooled_output": torch.randn(1, CONTEXT, generator=g)}]]


# ---------------------------------------------------------------- every family on its own model class
# Tiny configurations of each family's real host classes (supported_models config, model_base
# class, network): conditioning, attention layout, latent format and model sampling are the host's.
POOLED = 16  # a tiny pooled text embedding (SDXL/SD3/Flux vectors)
SDXL_UNET = dict(UNET, use_linear_in_transformer=True, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                 num_head_channels=16, num_classes="sequential", adm_in_channels=POOLED + 6 * 256)  # pooled + 6 size embeddings of 256
SD3_DIT = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
           "pos_embed_scaling_factor": None, "pos_embed_max_size": 16, "num_patches": 256, "adm_in_channels": POOLED,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT, "out_features": 128}},
           "qk_norm": "rms", "x_block_self_attn_layers": [0]}  # SD3.5 medium's layout: qk RMS norm, x-block self-attention
WAN_DIT = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16, "dim": 32,
           "ffn_dim": 64, "freq_dim": 32, "text_dim": CONTEXT, "num_heads": 2, "num_layers": 1, "text_len": 16}
QWEN_DIT = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": CONTEXT, "axes_dims_rope": (4, 6, 6)}


def tiny_sdxl(seed=0, std=0.05, out_scale=1.0):
    """SDXL's own classes: a linear-projection UNet with ADM conditioning y = [pooled, size embeddings]."""
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    m = patched(comfy.model_base.SDXL(config, device=torch.device("cpu")), seed, std)
    with torch.no_grad():  # a gentler output layer: GroupNorm makes a random UNet's eps too steep in x to invert
        m.model.diffusion_model.out[-1].weight.mul_(out_scale)
    return m


def tiny_sd3(seed=0, std=0.05):
    """SD3.5-medium-style MMDiT (joint [context, image] attention plus x-block self-attention) on model_base.SD3."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    config = comfy.supported_models.SD3(dict(SD3_DIT))
    model = comfy.model_base.SD3(config, device=torch.device("cpu"))
    net = model.diffusion_model.diffusion_model if hasattr(model.diffusion_model, "diffusion_model") else model.diffusion_model
    side = SD3_DIT["pos_embed_max_size"]  # its fixed 2D sin-cos table, a buffer a checkpoint would fill
    with torch.no_grad():
        net.pos_embed.copy_(torch.from_numpy(mmdit.get_2d_sincos_pos_embed(net.pos_embed.shape[-1], side)).float()[None])
    return patched(model, seed, std)


def tiny_wan(seed=0, std=0.05, **layout):
    """Wan 2.1 text-to-video on model_base.WAN21: 5D latents (B, 16, T, H, W), text cross-attention;
    ``layout`` overrides the tiny transformer's (``num_layers=2``, say)."""
    config = comfy.supported_models.WAN21_T2V(dict(WAN_DIT, **layout))
    return patched(comfy.model_base.WAN21(config, device=torch.device("cpu")), seed, std)


def tiny_wan22(seed=0, std=0.05):
    """Wan 2.2 TI2V-5B's layout on model_base.WAN22: 48-channel latents of the Wan 2.2 VAE, 5D."""
    config = comfy.supported_models.WAN22_T2V(dict(WAN_DIT, in_dim=48, out_dim=48))
    return patched(comfy.model_base.WAN22(config, image_to_video=True, device=torch.device("cpu")), seed, std)


def tiny_qwen(seed=0, std=0.05):
    """Qwen-Image on model_base.QwenImage (joint [text, image] attention, flow); None where the host lacks it."""
    if not hasattr(comfy.supported_models, "QwenImage"):
        return None
    config = comfy.supported_models.QwenImage(dict(QWEN_DIT))
    return patched(comfy.model_base.QwenImage(config, device=torch.device("cpu")), seed, std)


def text_prompt(seed, tokens=16, pooled=True, width=CONTEXT):
    """A random CONDITIONING of ``tokens`` context vectors (and a pooled vector where the family reads one)."""
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, POOLED, generator=g)} if pooled else {}
    return [[torch.randn(1, tokens, width, generator=g), extra]]


def counted(model):
    """``model`` (a clone with a unet function wrapper) with a count of every network evaluation."""
    calls = [0]
    inner = model.model_options["model_function_wrapper"]

    def wrapper(apply_model, args):
        calls[0] += 1
        return inner(apply_model, args)

    model.set_model_unet_function_wrapper(wrapper)
    return model, calls


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Output and input folders of our own, as the host's folder_paths reports them."""
    import folder_paths
    out, inp = tmp_path / "output", tmp_path / "input"
    out.mkdir()
    inp.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    monkeypatch.setattr(folder_paths, "input_directory", str(inp))
    return out, inp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(config, dirs, log_path, timeout=120):
    """A headless host with only this pack on a free loopback port; yields (base URL, /object_info).

    ``config`` is an extra-model-paths file naming the pack's custom_nodes folder; ``dirs`` the
    output, input, temp and user folders; the server's output goes to ``log_path``. The
    pack's root must not be on PYTHONPATH, where its ``nodes/`` would shadow the host's ``nodes.py``.
    """
    port = free_port()
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--extra-model-paths-config", str(config), "--output-directory", str(dirs["output"]),
           "--input-directory", str(dirs["input"]), "--temp-directory", str(dirs["temp"]),
           "--user-directory", str(dirs["user"]), "--database-url", "sqlite:///:memory:",
           # only this pack, even where the checkout has others (or this one) in its own custom_nodes
           "--disable-all-custom-nodes", "--whitelist-custom-nodes", "inversion-suite"]
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):  # another frontend's static folder (a newer release, say)
        cmd += ["--front-end-root", os.environ["COMFYUI_FRONTEND_ROOT"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=path(), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, info = time.monotonic() + timeout, None
        while time.monotonic() < deadline and info is None:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with LOCAL.open(base + "/object_info", timeout=30) as r:
                    info = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1)
        assert info is not None, f"no /object_info within {timeout} s:\n{log_path.read_text()[-4000:]}"
        yield base, info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def execute_graph(graph, extra_data=None):
    """Validate and run an API-format ``graph`` with the host's own executor; returns the executor."""
    import asyncio

    import execution

    class Server:
        client_id = None
        last_node_id = None

        def send_sync(self, *args, **kwargs):
            pass

    async def run():
        ok, err, outputs, node_errors = await execution.validate_prompt("r", graph, None)
        assert ok, (err, node_errors)
        ex = executor(Server())
        await ex.execute_async(graph, "r", extra_data=extra_data or {}, execute_outputs=outputs)
        return ex
    return asyncio.run(run())


# ---------------------------------------------------------------- the shipped workflows' files
# Empty placeholder files with the names the shipped workflows load (the server's validation and
# the frontend only list them), and the inputs they open: a photo whose alpha marks the painted
# region (LoadImage's MASK is 1 - alpha) and a short clip with its mask clip.
MODELS = {
    "checkpoints": ["v1-5-pruned-emaonly.safetensors", "sd3.5_medium.safetensors", "sd_xl_base_1.0.safetensors"],
    "text_encoders": ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["ae.safetensors", "qwen_image_vae.safetensors", "wan2.2_vae.safetensors"],
    "diffusion_models": ["flux1-dev.safetensors", "qwen_image_fp8_e4m3fn.safetensors", "wan2.2_ti2v_5B_fp16.safetensors"],
}
CLIP, CLIP_MASK = "clip.mp4", "clip_mask.mp4"


def placeholder_models(base):
    """The placeholder model files under ``base/<folder>``; returns {folder: its path}."""
    made = {}
    for folder, names in MODELS.items():
        d = pathlib.Path(base) / folder
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            (d / n).write_bytes(b"")
        made[folder] = d
    return made


def write_clip(path, frames=5, size=64, mask=False):
    """An H.264 clip of ``frames`` frames: a moving gradient, or its mask (white right half)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        for t in range(frames):
            if mask:
                img = np.zeros((size, size, 3), np.uint8)
                img[:, size // 2 + t % 2:] = 255
            else:
                img = np.stack([np.add.outer(ramp, ramp * 0.5 + 8 * t) % 256, np.tile(ramp, (size, 1)),
                                np.full((size, size), 90.0)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def workflow_inputs(folder):
    """The files the shipped workflows open, in the input ``folder``."""
    from PIL import Image

    img = Image.new("RGBA", (64, 64), (120, 90, 60, 255))
    img.paste((150, 110, 70, 0), (32, 0, 64, 64))  # the painted region: the right half
    img.save(pathlib.Path(folder) / "example.png")
    write_clip(pathlib.Path(folder) / CLIP)
    write_clip(pathlib.Path(folder) / CLIP_MASK, mask=True)
