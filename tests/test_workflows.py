"""The example workflows, the node metadata and the pack's loading, checked against the real host.

Each UI workflow in ``workflows/`` is converted to the API format the way the frontend does
it (widget values mapped positionally onto the widget inputs of the node's object_info, the
extra ``control_after_generate`` and upload-button values skipped, links turned into
``[node_id, slot]``, Note nodes dropped) and passed through the server's own
``execution.validate_prompt``. Empty placeholder files with the standard model names stand
in for the checkpoints. A second test starts ComfyUI's ``main.py`` with the pack installed
from a ``custom_nodes`` folder and reads ``/object_info``, a help page and the workflow
templates over HTTP.
"""

import asyncio
import json
import pathlib
import zlib

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import torch

import folder_paths
import utils.extra_config  # noqa: F401  (before the host's nodes.py, as main.py does)
import execution  # imports the host's nodes.py, so after utils.extra_config
import nodes as core  # the host's nodes.py
from comfy_api.internal import _ComfyNodeInternal

ROOT = comfy_host.ROOT
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PACK_NODES = {f"InversionSuite_{n}" for n in (
    "Invert", "Reconstruct", "InversionSampler", "BlendedGuidanceSampler", "StochasticEditSampler",
    "SaveInversion", "LoadInversion", "ReconstructionReport", "FlowEdit", "RFInversionEdit")}
NOTES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget after these, as after control_after_generate
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
EXPECTED = {  # node types each workflow must contain (the file names are the template browser's titles)
    "Invert and reconstruct (SD1.5)": {
        "CheckpointLoaderSimple", "LoadImage", "VAEEncode", "CLIPTextEncode", "VAEDecode", "InversionSuite_Invert",
        "InversionSuite_Reconstruct", "InversionSuite_ReconstructionReport"},
    "Blended guidance edit (SD1.5)": {
        "CheckpointLoaderSimple", "LoadImage", "InversionSuite_Invert", "InversionSuite_BlendedGuidanceSampler",
        "MaskToImage"},
    "Stochastic edits, best kept (SD1.5)": {
        "CheckpointLoaderSimple", "LoadImage", "InversionSuite_Invert", "InversionSuite_StochasticEditSampler"},
    "Masked edit of a flow model (SD3.5)": {
        "LoadImage", "InversionSuite_Invert", "InversionSuite_BlendedGuidanceSampler"},
    "Compare five methods (SD1.5)": {
        "CheckpointLoaderSimple", "InversionSuite_Invert", "InversionSuite_Reconstruct",
        "InversionSuite_ReconstructionReport"},
    "Masked photo edit (Flux.1-dev)": {
        "UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "InversionSuite_FlowEdit",
        "InversionSuite_RFInversionEdit"},
    "Masked photo edit (Qwen-Image)": {
        "UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow", "InversionSuite_Invert",
        "InversionSuite_BlendedGuidanceSampler", "InversionSuite_FlowEdit"},
    "Masked photo edit (SDXL)": {
        "CheckpointLoaderSimple", "InversionSuite_Invert", "InversionSuite_BlendedGuidanceSampler",
        "InversionSuite_FlowEdit"},
    "Masked video edit (Wan 2.2)": {
        "UNETLoader", "CLIPLoader", "VAELoader", "LoadVideo", "GetVideoComponents", "ImageToMask",
        "InversionSuite_Invert", "InversionSuite_BlendedGuidanceSampler", "InversionSuite_FlowEdit"},
}
# The workflows for a family beyond SD1.5 and SD3.5, and the tiny host classes they run on here.
FAMILY = {"Masked photo edit (Flux.1-dev)": "flux",
          "Masked photo edit (Qwen-Image)": "qwen-image",
          "Masked photo edit (SDXL)": "sdxl",
          "Masked video edit (Wan 2.2)": "wan2.2"}
LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader")


def node_info(name):
    """What GET /object_info serves for one node class (server.py's ``node_info``)."""
    cls = core.NODE_CLASS_MAPPINGS[name]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": cls.RETURN_TYPES,
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), "name": name,
        "description": getattr(cls, "DESCRIPTION", ""), "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
        **({"output_tooltips": cls.OUTPUT_TOOLTIPS} if hasattr(cls, "OUTPUT_TOOLTIPS") else {}),
    }


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Core nodes, the pack loaded by the host's own loader, placeholder models and an input image."""
    base = tmp_path_factory.mktemp("comfy_files")
    mp = pytest.MonkeyPatch()
    for folder, d in comfy_host.placeholder_models(base / "models").items():
        exts = folder_paths.folder_names_and_paths[folder][1]
        mp.setitem(folder_paths.folder_names_and_paths, folder, ([str(d)], exts))
    mp.setattr(folder_paths, "filename_list_cache", {})
    inputs = base / "input"
    inputs.mkdir()
    comfy_host.workflow_inputs(inputs)
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(inputs))
    try:
        if "PrimitiveStringMultiline" not in core.NODE_CLASS_MAPPINGS:  # comfy_extras not loaded yet
            asyncio.run(core.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        # The pack is already imported as ``inversion_suite`` by conftest.py; the host's loader
        # imports it again under its own module name (the folder's path), as the server does.
        assert asyncio.run(core.load_custom_node(str(ROOT), ignore=set(), module_parent="custom_nodes"))
        yield {name: node_info(name) for name in core.NODE_CLASS_MAPPINGS}
    finally:
        folder_paths.set_input_directory(old_input)
        mp.undo()


def widget_inputs(info):
    """(name, spec, section) of the node's widget inputs in the order the frontend creates its widgets."""
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                yield name, spec, section


def to_api(workflow, object_info):
    """The API-format prompt the frontend queues for a UI-format workflow."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTES or node.get("mode", 0) in (2, 4):  # notes; muted or bypassed nodes
            continue
        where = f"node {node['id']} ({node['type']})"
        assert node["type"] in object_info, f"{where}: unknown node type"
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, _ in widget_inputs(info):
            assert values, f"{where}: no widget value left for {name!r}"
            inputs[name] = values.pop(0)
            opts = spec[1] if len(spec) > 1 else {}
            if spec[0] == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                assert values and values[0] in ("fixed", "increment", "decrement", "randomize"), \
                    f"{where}: expected a control_after_generate value after {name!r}"
                values.pop(0)
            if any(opts.get(flag) for flag in UPLOAD_FLAGS):
                values.pop(0)  # the upload button's value
        assert not values, f"{where}: {len(values)} widget value(s) more than the node has widgets: {values}"
        for index, slot in enumerate(node.get("inputs", [])):
            if slot.get("link") is None:
                continue
            _, src, src_slot, dst, dst_slot, _ = links[slot["link"]]
            assert (dst, dst_slot) == (node["id"], index), f"{where}: link {slot['link']} does not end here"
            inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def combo_errors(prompt, object_info):
    """Values of V3 COMBO widgets outside their options (the host's validation checks only V1 list combos)."""
    errors = []
    for nid, node in prompt.items():
        for name, spec, _ in widget_inputs(object_info[node["class_type"]]):
            value = node["inputs"].get(name)
            if isinstance(value, list):  # linked
                continue
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None
            if options is not None and value not in options:
                errors.append(f"{nid} {node['class_type']}.{name} = {value!r} not in {options[:8]}")
    return errors


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_the_workflows_are_there():
    assert {p.stem for p in WORKFLOWS} >= set(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed_ui_json(path, host):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["groups"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    for node in wf["nodes"]:
        assert len(node["pos"]) == 2 and len(node["size"]) == 2, node["id"]
        if node["type"] in NOTES:
            assert node["widgets_values"] and node["widgets_values"][0].strip()
            continue
        module = host[node["type"]]["python_module"].split(".")[0]
        assert node["type"] in PACK_NODES or module in ("nodes", "comfy_extras"), \
            f"{node['type']} is neither a core node nor this pack's"
    for lid, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        assert lid in out["links"] and out["type"] == kind, lid
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, lid
    for node in wf["nodes"]:
        for slot in node.get("outputs", []):
            for lid in slot.get("links") or []:
                assert any(link[0] == lid for link in wf["links"]), lid
    types = {n["type"] for n in wf["nodes"]}
    assert "Note" in types, "every workflow explains itself in a Note"
    assert EXPECTED.get(path.stem, set()) <= types


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_passes_the_servers_validation(path, host):
    prompt = to_api(load(path), host)
    assert not combo_errors(prompt, host)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(path.stem, prompt, None))
    assert ok, (error, node_errors)
    assert node_errors == {}
    wanted = {nid for nid, n in prompt.items() if host[n["class_type"]].get("output_node")}
    assert set(outputs) == wanted  # every output validated, none dropped


def test_workflow_settings_match_their_purpose(host):
    by = {p.stem: to_api(load(p), host) for p in WORKFLOWS}

    def of(name, kind):
        return [n["inputs"] for n in by[name].values() if n["class_type"] == kind]

    assert [i["method"] for i in of("Invert and reconstruct (SD1.5)", "InversionSuite_Invert")] == ["aidi_anderson"]
    assert [i["count"] for i in of("Stochastic edits, best kept (SD1.5)", "InversionSuite_StochasticEditSampler")] == [4]
    assert all(i["keep_trajectory"] for i in of("Stochastic edits, best kept (SD1.5)", "InversionSuite_Invert"))
    blended = of("Blended guidance edit (SD1.5)", "InversionSuite_BlendedGuidanceSampler")[0]
    assert "clip" in blended and blended["words"]
    flow = of("Masked edit of a flow model (SD3.5)", "InversionSuite_BlendedGuidanceSampler")[0]
    assert "mask" in flow and "clip" not in flow and flow["mask_mode"] == "replace"
    assert [i["scheduler"] for i in of("Masked edit of a flow model (SD3.5)", "InversionSuite_Invert")] == ["simple"]
    methods = [i["method"] for i in of("Compare five methods (SD1.5)", "InversionSuite_Invert")]
    assert len(set(methods)) == len(methods) >= 3
    assert len(of("Compare five methods (SD1.5)", "InversionSuite_Reconstruct")) == len(methods)
    assert len(of("Compare five methods (SD1.5)", "InversionSuite_ReconstructionReport")) == len(methods)


# ---------------------------------------------------------------- the family workflows, run
# The loaders' real files are many gigabytes, so the graph runs on placeholders the test builds:
# the family's tiny host model classes (comfy_host), its real VAE architecture at random weights
# loaded by the host's own comfy.sd.VAE, and a random CONDITIONING per text in the place of the
# text encoders (a 7B Qwen-VL or a T5 cannot be built small through the host's loader). Everything
# else (image and mask nodes, ModelSampling*, FluxGuidance, LoadVideo, the pack's nodes, VAE
# encode and decode, the savers) is the workflow's own, with its own values, images at 64x64.
def _tiny(family):
    return {"flux": lambda: comfy_host.tiny_flux(std=0.05), "qwen-image": comfy_host.tiny_qwen,
            "sdxl": lambda: comfy_host.tiny_sdxl(std=0.05, out_scale=0.1), "wan2.2": comfy_host.tiny_wan22}[family]()


def _conditioning(family, text):
    seed = zlib.crc32(text.encode())
    if family == "flux":
        return comfy_host.flux_prompt(seed, tokens=32)
    return comfy_host.text_prompt(seed, tokens=77 if family == "sdxl" else 32, pooled=family == "sdxl")


def _vae(family):
    """The family's VAE architecture with random weights (norm scales 1, biases 0), through comfy.sd.VAE."""
    import comfy.ldm.models.autoencoder
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2
    import comfy.sd

    wan = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
               dropout=0.0)
    if family in ("sdxl", "flux"):
        z = 4 if family == "sdxl" else 16
        dd = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        net = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dd, embed_dim=z)
    elif family == "qwen-image":  # the Wan 2.1 VAE
        net = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, **wan)
    else:
        net = comfy.ldm.wan.vae2_2.WanVAE(dim=160, z_dim=48, **wan)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in net.state_dict().items():
        if v.ndim <= 1 or v.numel() == v.shape[0]:
            sd[k] = torch.ones(v.shape) if k.endswith(("weight", "gamma")) else torch.zeros(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (v[0].numel() ** -0.5)
    return comfy.sd.VAE(sd=sd)


def _node(types, run):
    class Node:
        CATEGORY, FUNCTION, RETURN_TYPES = "test", "run", types

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}} if types == (
                "CONDITIONING",) else {"required": {}}

    Node.run = lambda self, **kw: run(**kw)
    return Node


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_workflow_runs_through_the_executor(name, host, monkeypatch, tmp_path):
    family = FAMILY[name]
    model = _tiny(family)
    if model is None:
        pytest.skip(f"this host has no {family} model class")
    vae, clip = _vae(family), object()
    made = {"MODEL": model, "CLIP": clip, "VAE": vae}

    def encode(clip=None, text=""):
        assert clip is made["CLIP"]
        return (_conditioning(family, text),)

    prompt = to_api(load(ROOT / "workflows" / f"{name}.json"), host)
    for nid, node in prompt.items():
        kind = node["class_type"]
        if kind in LOADERS:
            types = tuple(host[kind]["output"])
            monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, f"Test{kind}", _node(types, lambda t=types: tuple(made[x] for x in t)))
            node.update(class_type=f"Test{kind}", inputs={})
        elif kind == "CLIPTextEncode":
            monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestEncode", _node(("CONDITIONING",), encode))
            node["class_type"] = "TestEncode"
        elif kind == "ImageScale":
            node["inputs"].update(width=64, height=64)
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    ex = comfy_host.execute_graph(prompt)
    assert ex.success, ex.status_messages
    outputs = ex.history_result["outputs"]
    saved = [nid for nid, n in prompt.items() if n["class_type"] in ("SaveImage", "SaveAnimatedWEBP")]
    assert saved and all(outputs[nid]["images"] for nid in saved)
    for nid in saved:
        for img in outputs[nid]["images"]:
            assert (tmp_path / img["subfolder"] / img["filename"]).stat().st_size > 0
    if family == "wan2.2":  # 5 frames in, 2 latent frames, 5 frames out
        from PIL import Image

        for nid in saved:
            frames = Image.open(tmp_path / outputs[nid]["images"][0]["subfolder"] / outputs[nid]["images"][0]["filename"])
            assert frames.n_frames == 5
    for nid, n in prompt.items():
        if n["class_type"] == "InversionSuite_Invert":
            assert "Round trip measured" in outputs[nid]["text"][0]


def test_family_workflows_carry_their_model_files(host):
    """Each loader names its files with a download URL and models folder, so the frontend offers missing ones."""
    folder = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name": "text_encoders",
              "clip_name1": "text_encoders", "clip_name2": "text_encoders", "vae_name": "vae"}
    for name in FAMILY:
        for node in load(ROOT / "workflows" / f"{name}.json")["nodes"]:
            if node["type"] not in LOADERS:
                continue
            files = {(folder[k], v) for k, v in to_api({"nodes": [node], "links": []}, host)[str(node["id"])]["inputs"].items()
                     if k in folder}
            models = node["properties"].get("models", [])
            assert {(m["directory"], m["name"]) for m in models} == files, (name, node["type"])
            assert all(m["url"].startswith("https://huggingface.co/") and m["url"].split("?")[0].endswith(m["name"])
                       for m in models), (name, models)
            assert all(f in comfy_host.MODELS[d] for d, f in files)


def test_family_workflow_settings(host):
    by = {p.stem: to_api(load(p), host) for p in WORKFLOWS if p.stem in FAMILY}

    def of(name, kind):
        return [n["inputs"] for n in by[name].values() if n["class_type"] == kind]

    flux = "Masked photo edit (Flux.1-dev)"
    # guidance-distilled: guidance through FluxGuidance, never a second (cfg) pass
    for kind in ("InversionSuite_FlowEdit", "InversionSuite_RFInversionEdit"):
        assert [(i["cfg_source"], i["cfg_target"]) for i in of(flux, kind)] == [(1.0, 1.0)]
    assert sorted(i["guidance"] for i in of(flux, "FluxGuidance")) == [1.5, 3.5, 5.5]
    for name, graph in by.items():
        editors = [n for n in graph.values() if n["class_type"] in (
            "InversionSuite_FlowEdit", "InversionSuite_RFInversionEdit", "InversionSuite_BlendedGuidanceSampler")]
        assert editors and all(n["inputs"]["mask_mode"] == "replace" and "mask" in n["inputs"] for n in editors), name
        if name != flux:  # true guidance: the negative prompt is connected
            assert all("negative" in n["inputs"] for n in editors), name
    wan = by["Masked video edit (Wan 2.2)"]
    mask = next(n for n in wan.values() if n["class_type"] == "ImageToMask")
    scaled = wan[mask["inputs"]["image"][0]]
    assert wan[scaled["inputs"]["image"][0]]["class_type"] == "GetVideoComponents"  # one mask per frame of a clip


def test_a_bad_widget_value_is_caught(host):
    """The converter and the checks really look: a wrong step count and an unknown method are refused."""
    wf = load(ROOT / "workflows" / "Invert and reconstruct (SD1.5).json")
    node = next(n for n in wf["nodes"] if n["type"] == "InversionSuite_Invert")
    names = [name for name, _, _ in widget_inputs(host["InversionSuite_Invert"])]
    node["widgets_values"][names.index("steps")] = 0
    node["widgets_values"][names.index("method")] = "nope"
    prompt = to_api(wf, host)
    assert combo_errors(prompt, host)
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("bad", prompt, None))
    assert not ok or node_errors
    node["widgets_values"].append(1)
    with pytest.raises(AssertionError, match="more than the node has widgets"):
        to_api(wf, host)


def missing_help(info):
    """Inputs and outputs without a tooltip, and a missing description."""
    missing = [] if (info.get("description") or "").strip() else ["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if not (len(spec) > 1 and str(spec[1].get("tooltip") or "").strip()):
                missing.append(f"input {name}")
    tips = info.get("output_tooltips") or []
    for i, name in enumerate(info.get("output_name") or info["output"]):
        if i >= len(tips) or not (tips[i] or "").strip():
            missing.append(f"output {name}")
    return missing


def test_the_host_loader_registers_the_eight_nodes(host):
    assert PACK_NODES <= set(host)
    module = core.get_module_name(str(ROOT))
    for name in PACK_NODES:
        assert host[name]["python_module"] == f"custom_nodes.{module}"
        assert host[name]["category"] == "sampling/inversion"
    # WEB_DIRECTORY: the frontend fetches /extensions/<folder>/docs/<node_id>.md
    assert pathlib.Path(core.EXTENSION_WEB_DIRS[module]) == ROOT / "web"


@pytest.mark.parametrize("name", sorted(PACK_NODES))
def test_every_input_and_output_has_a_tooltip_and_the_node_a_description(name, host):
    assert missing_help(host[name]) == []


@pytest.mark.parametrize("name", sorted(PACK_NODES))
def test_every_node_has_a_help_page(name):
    page = ROOT / "web" / "docs" / f"{name}.md"
    assert page.is_file() and page.read_text(encoding="utf-8").startswith("# ")


# ---------------------------------------------------------------- the real server



def get(url, timeout=10):
    with comfy_host.LOCAL.open(url, timeout=timeout) as r:
        return r.status, r.read()


def test_the_headless_server_lists_the_pack(tmp_path):
    packs = tmp_path / "custom_nodes"
    packs.mkdir()
    try:
        (packs / "inversion-suite").symlink_to(ROOT, target_is_directory=True)
    except OSError as e:  # e.g. Windows without the symlink privilege
        pytest.skip(f"cannot create a symlink to the pack: {e}")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"inversion_suite_test:\n  custom_nodes: {packs}\n")
    dirs = {k: tmp_path / k for k in ("output", "input", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    log_path = tmp_path / "server.log"
    with comfy_host.serving(config, dirs, log_path, timeout=90) as (base, info):
        assert PACK_NODES <= set(info)
        assert {info[name]["python_module"] for name in PACK_NODES} == {"custom_nodes.inversion-suite"}
        status, page = get(f"{base}/extensions/inversion-suite/docs/InversionSuite_Invert.md")  # the help page
        assert status == 200 and page.decode("utf-8").startswith("# ")
        status, templates = get(base + "/api/workflow_templates")  # the workflows, offered as templates
        assert set(json.loads(templates).get("inversion-suite", [])) >= set(EXPECTED)
        missing = {name: missing_help(info[name]) for name in sorted(PACK_NODES)}
        assert {k: v for k, v in missing.items() if v} == {}
    log = log_path.read_text()
    bad = [line for line in log.splitlines() if "inversion-suite" in line and
           ("IMPORT FAILED" in line or "Cannot import" in line or "Traceback" in line)]
    assert not bad, bad
    assert any("inversion-suite" in line and "seconds" in line for line in log.splitlines())  # import times list it
