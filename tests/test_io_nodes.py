"""SaveInversion, LoadInversion and ReconstructionReport inside the real ComfyUI host."""

import copy
import json
import os
import shutil

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import safetensors
import safetensors.torch
import torch
from comfy_host import exact_model, folders, prompt, run_invert, run_reconstruct, vae_scale  # noqa: F401  (folders: a fixture)

import folder_paths
import utils.extra_config  # noqa: F401  (before the host's nodes.py, as main.py does)
import nodes as core  # the host's nodes.py; the pack is loaded as ``inversion_suite``
from analytic import Mixture
from inversion_suite.nodes import NODES
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.save_load import LoadInversion, SaveInversion
from inversion_suite.nodes.report import ReconstructionReport
from inversion_suite.solvers import METHODS, metrics

MIX = Mixture((4, 8, 8), components=3, seed=0)
SCHEDULER = {"eps": "karras", "v": "normal", "flow": "simple"}


pytestmark = pytest.mark.usefixtures("folders")  # comfy_host's: input and output folders of the test's own


def inverted(model, kind="eps", method="bdia", steps=3):
    source = {"samples": vae_scale(model, MIX.sample(2, seed=4).float()), "batch_index": [3, 4]}
    return run_invert(model, source, prompt(1), method, steps, SCHEDULER[kind])


def save(latent, prefix="inversions/test"):
    """Save, then move the file into the input folder as a user would; returns its name there."""
    result = SaveInversion.execute(latent=latent, filename_prefix=prefix)
    saved = result.ui["latents"][0]
    src = os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])
    shutil.copy(src, folder_paths.get_input_directory())
    return saved["filename"]


def load(model, name):
    return LoadInversion.execute(model=model, inversion=name).result[0]


def reconstruct(model, latent):
    return run_reconstruct(model, latent, prompt(1))


def assert_same(a, b, where="latent"):
    """Equal bit for bit, and of the same types (a tuple stays a tuple, float64 stays float64)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def path_in_input(name):
    return os.path.join(folder_paths.get_input_directory(), name)


# --- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_save_then_load_is_bit_exact_for_every_method(method):
    model = exact_model("eps", MIX)
    original = inverted(model, method=method)
    keep = copy.deepcopy(original)
    name = save(original)
    assert name.endswith("_.safetensors") and name.startswith("test_00001")
    loaded = load(model, name)
    assert_same(keep, original)  # saving leaves its input alone
    assert_same(original, loaded)
    rec = loaded["inversion"]
    assert rec["samples"] is loaded["samples"]  # Reconstruct's check for untouched samples
    # One latent per sigma of the saved schedule, split steps of the implicit methods included.
    assert rec["trajectory"] is not None and len(rec["trajectory"]) == len(rec["sigmas"]) >= 4
    assert torch.equal(reconstruct(model, loaded)["samples"], reconstruct(model, original)["samples"])


@pytest.mark.parametrize("kind", ("v", "flow"))
def test_round_trip_for_other_model_types(kind):
    model = exact_model(kind, MIX)
    original = inverted(model, kind, method="aidi_anderson")
    loaded = load(model, save(original))
    assert_same(original, loaded)
    assert torch.equal(reconstruct(model, loaded)["samples"], reconstruct(model, original)["samples"])


def test_counter_and_values_json_cannot_hold_natively():
    model = exact_model("eps", MIX)
    original = inverted(model, method="renoise")
    odd = dict(original, inversion=dict(original["inversion"], note=(1, [2.5, None], {"x": float("inf")}),
                                        half=torch.arange(6, dtype=torch.float16).view(2, 3)[:, 1:]))
    first, second = save(odd), save(odd)
    assert (first, second) == ("test_00001_.safetensors", "test_00002_.safetensors")
    assert_same(odd, load(model, second))


def test_the_file_is_plain_safetensors_with_a_format_version():
    model = exact_model("eps", MIX)
    name = save(inverted(model))
    with safetensors.safe_open(path_in_input(name), framework="pt") as f:
        meta = f.metadata()
    assert meta["inversion_suite_format"] == "1"
    assert json.loads(meta["inversion_suite_latent"])["inversion"]["method"] == "bdia"


# --- files that are refused ---------------------------------------------------------------------

def refused(model, name, *words):
    with pytest.raises(NodeInputError) as e:
        load(model, name)
    message = str(e.value)
    assert message.startswith("LoadInversion: input 'inversion'") or message.startswith("LoadInversion: input 'model'")
    for w in words:
        assert w in message, message
    return message


def test_truncated_files_are_refused():
    model = exact_model("eps", MIX)
    data = open(path_in_input(save(inverted(model))), "rb").read()
    for cut, name in ((len(data) - 100, "cut_data.safetensors"), (40, "cut_header.safetensors"),
                      (5, "cut_size.safetensors")):
        with open(path_in_input(name), "wb") as f:
            f.write(data[:cut])
        refused(model, name, repr(name), "truncated or corrupt")


def test_a_core_savelatent_file_is_refused():
    model = exact_model("eps", MIX)
    ui = core.SaveLatent().save({"samples": torch.randn(1, 4, 8, 8)}, filename_prefix="plain")["ui"]["latents"][0]
    shutil.copy(os.path.join(folder_paths.get_output_directory(), ui["filename"]), folder_paths.get_input_directory())
    refused(model, ui["filename"], "core SaveLatent", "LoadLatent")
    safetensors.torch.save_file({"x": torch.zeros(2)}, path_in_input("other.safetensors"))
    refused(model, "other.safetensors", "not an inversion file", "inversion_suite_format")


def test_a_newer_format_is_refused():
    model = exact_model("eps", MIX)
    name = save(inverted(model))
    with safetensors.safe_open(path_in_input(name), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, path_in_input("newer.safetensors"), metadata=dict(meta, inversion_suite_format="2"))
    refused(model, "newer.safetensors", "format 2", "update the pack")
    safetensors.torch.save_file(tensors, path_in_input("bad.safetensors"), metadata=dict(meta, inversion_suite_format="x"))
    refused(model, "bad.safetensors", "truncated or corrupt", "not a number")
    safetensors.torch.save_file(tensors, path_in_input("gutted.safetensors"),
                                metadata=dict(meta, inversion_suite_latent=json.dumps({"samples": {"__tensor__": "t0"}})))
    refused(model, "gutted.safetensors", "carries no inversion record")


def test_an_inversion_from_another_model_type_is_refused():
    flow = exact_model("flow", MIX)
    name = save(inverted(flow, "flow"))
    message = refused(exact_model("eps", MIX), name, "made with a CONST model", "this model is EPS")
    assert message.startswith("LoadInversion: input 'model'")
    assert_same(load(flow, name)["inversion"]["model"], {"prediction": "CONST", "latent_format": "SD15"})


def test_missing_files_plain_latents_and_the_file_list():
    model = exact_model("eps", MIX)
    with pytest.raises(NodeInputError, match="SaveInversion: input 'latent': carries no inversion record"):
        SaveInversion.execute(latent={"samples": torch.zeros(1, 4, 8, 8)}, filename_prefix="x")
    refused(model, "nowhere.safetensors", "no readable inversion file")
    assert "no readable inversion file" in LoadInversion.validate_inputs(inversion="nowhere.safetensors")
    name = save(inverted(model))
    assert LoadInversion.validate_inputs(inversion=name) is True
    open(path_in_input("notes.txt"), "w").write("x")
    options = LoadInversion.INPUT_TYPES()["required"]["inversion"][1]["options"]
    assert options == [name]
    before = LoadInversion.fingerprint_inputs(inversion=name)
    with open(path_in_input(name), "ab") as f:
        f.write(b" ")
    assert LoadInversion.fingerprint_inputs(inversion=name) != before


# --- ReconstructionReport -----------------------------------------------------------------------

def test_report_on_latents_matches_the_metrics_module():
    model = exact_model("eps", MIX)
    original = inverted(model, method="ddim", steps=4)
    source, rec = {"samples": original["inversion"]["source"]}, reconstruct(model, original)
    out = ReconstructionReport.execute(latent_a=source, latent_b=rec)
    expected = metrics.report(source["samples"], rec["samples"])
    rel, psnr, ssim, text = out.result
    assert (rel, psnr, ssim) == (expected["mean"]["rel_error"], expected["mean"]["psnr"], expected["mean"]["ssim"])
    assert all(isinstance(v, float) for v in (rel, psnr, ssim)) and 0 < rel < 1 and ssim < 1
    assert text == metrics.table(expected, "2 item(s), latents, data range: latent_a max - min per item")
    assert out.ui.as_dict() == {"text": (text,)}


def test_report_on_images_uses_range_one():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 24, 20, 3, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    keep = (a.clone(), b.clone())
    rel, psnr, ssim, text = ReconstructionReport.execute(image_a=a, image_b=b).result
    ca, cb = a.movedim(-1, 1), b.movedim(-1, 1)
    assert psnr == float(metrics.psnr(ca, cb, 1.0).mean()) and ssim == float(metrics.ssim(ca, cb, 1.0).mean())
    assert rel == float(metrics.rel_error(ca, cb).mean())
    assert torch.equal(keep[0], a) and torch.equal(keep[1], b)
    assert "images, data range 1" in text and len(text.splitlines()) == 6  # title, header, 3 items, mean
    same = ReconstructionReport.execute(image_a=a, image_b=a).result
    assert same[:3] == (0.0, float("inf"), pytest.approx(1.0)) and "inf" in same[3]


def test_report_refuses_bad_inputs():
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    img = torch.zeros(1, 8, 8, 3)
    cases = [({}, "latent_a", "nothing connected"),
             ({"latent_a": lat}, "latent_b", "not connected"),
             ({"image_b": img}, "image_a", "not connected"),
             ({"latent_a": lat, "latent_b": lat, "image_a": img, "image_b": img}, "latent_a", "not both"),
             ({"latent_a": lat, "latent_b": {"samples": torch.zeros(1, 4, 8, 16)}}, "latent_b", "same shape"),
             ({"image_a": img, "image_b": torch.zeros(2, 8, 8, 3)}, "image_b", "same shape"),
             ({"latent_a": lat, "latent_b": img}, "latent_b", "LATENT"),
             ({"image_a": img, "image_b": lat}, "image_b", "IMAGE"),
             ({"image_a": img, "image_b": torch.full_like(img, float("nan"))}, "image_a", "NaN"),
             # Empty inputs: before, NaN figures (empty batch) or a raw IndexError (empty frame).
             ({"latent_a": {"samples": torch.zeros(0, 4, 8, 8)}, "latent_b": {"samples": torch.zeros(0, 4, 8, 8)}},
              "latent_a", "is empty"),
             ({"image_a": torch.zeros(1, 0, 0, 3), "image_b": torch.zeros(1, 0, 0, 3)}, "image_a", "is empty")]
    for kwargs, what, words in cases:
        with pytest.raises(NodeInputError) as e:
            ReconstructionReport.execute(**kwargs)
        assert str(e.value).startswith(f"ReconstructionReport: input '{what}'") and words in str(e.value), str(e.value)


def test_report_shows_its_text_when_the_host_runs_it(monkeypatch):

    for cls in NODES:
        monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, cls.GET_SCHEMA().node_id, cls)
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
             "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0x808080}},
             "3": {"class_type": "InversionSuite_ReconstructionReport", "inputs": {"image_a": ["2", 0], "image_b": ["1", 0]}}}

    ex = comfy_host.execute_graph(graph)
    assert ex.success, ex.status_messages
    text = ex.history_result["outputs"]["3"]["text"][0]
    assert text.splitlines()[0] == "2 item(s), images, data range 1" and "mean" in text


def test_schemas_have_tooltips_and_a_description():
    for cls in (SaveInversion, LoadInversion, ReconstructionReport):
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("InversionSuite_") and schema.display_name.replace(" ", "") == schema.node_id.split("_", 1)[1]
        assert schema.category == "sampling/inversion" and schema.description
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
        assert cls in NODES
