"""The inversion record and LoadInversion against crafted input, inside the real ComfyUI host.

Every field of a record is made wrong in every way it can be; each must be refused with
the node and the input named before the model is called, whether the record arrives in
a LATENT (Reconstruct) or in a file (LoadInversion). Files outside the input folder are
refused with the wording of a missing one.
"""

import builtins
import dataclasses
import json
import os
import pathlib
import shutil

import comfy_host  # skips this module where no ComfyUI is found
import pytest
import safetensors
import safetensors.torch
import torch
from comfy_host import exact_model, folders, prompt, run_invert, run_reconstruct, vae_scale  # noqa: F401  (folders: a fixture)

import comfy.samplers
import folder_paths
import utils.extra_config  # noqa: F401  (before the host's nodes.py, as main.py does)
import nodes as core  # the host's nodes.py
from analytic import Mixture
from inversion_suite.nodes.host import files
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.blended_guidance import BlendedGuidanceSampler
from inversion_suite.nodes.host.run import run_guider
from inversion_suite.nodes.invert import Invert
from inversion_suite.nodes.save_load import LoadInversion, SaveInversion
from inversion_suite.nodes.reconstruct import Reconstruct
from inversion_suite.nodes.stochastic_edit import StochasticEditSampler
from inversion_suite.nodes.host.record import Record
from inversion_suite.nodes.host.files import encode
from inversion_suite.solvers.record import FORMAT, KEYS, LATER as SOLVER_LATER, REFINE, Inversion
from inversion_suite.solvers import NonFiniteError, SolverError

MIX = Mixture((4, 8, 8), components=3, seed=0)
DATA = pathlib.Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("folders")  # comfy_host's: input and output folders of the test's own


def counting(kind="eps"):
    """The exact mixture model, with a count of every network evaluation."""
    return comfy_host.counted(exact_model(kind, MIX))


def invert(model, method="bdia", steps=3, **kw):
    source = {"samples": vae_scale(model, MIX.sample(2, seed=4).float()), "batch_index": [3, 4]}
    return run_invert(model, source, prompt(1), method, steps, **kw)


def reconstruct(model, latent, cfg=-1.0):
    return run_reconstruct(model, latent, prompt(1), cfg)


def write(latent, name):
    """A file as SaveInversion writes it, whatever the LATENT holds (SaveInversion itself would refuse)."""
    tensors, content = encode("test", latent)
    meta = {files.VERSION_KEY: str(files.FILE_FORMAT), files.CONTENT_KEY: content}
    safetensors.torch.save_file(tensors, os.path.join(folder_paths.get_input_directory(), name), metadata=meta)
    return name


def load(model, name):
    return LoadInversion.execute(model=model, inversion=name).result[0]


# --- the crafted record ---------------------------------------------------------------------

def cases(rec):
    """(field, wrong value or MISSING, words the refusal must hold) for a 3-step, batch-2 BDIA record."""
    x = rec["samples"]
    sig = rec["sigmas"]
    wide = torch.zeros(2, 4, 8, 9)
    nan = torch.full_like(x, float("nan"))
    out = []
    for field in rec:
        if field not in LATER:  # the fields added later read from older records without them
            out.append((field, MISSING, [f"lacks {field}"] if field != "format" else ["format"]))
    out += [
        ("format", "1", ["format"]), ("format", 1.0, ["format"]), ("format", True, ["format"]),
        ("format", 0, ["format"]), ("format", None, ["format"]), ("format", FORMAT + 1, ["newer", "update the pack"]),
        ("method", 3, ["'method'"]), ("method", "nope", ["'method'", "'nope'"]), ("method", None, ["'method'"]),
        ("method", "ddim", ["'sampler'"]),  # consistent fields: ddim resumes with euler
        ("settings", [], ["'settings'"]), ("settings", {}, ["'settings'", "gamma"]),
        ("settings", {"gamma": 0.94, "x": 1}, ["'settings'", "'x'"]), ("settings", {"gamma": "0.94"}, ["settings.gamma"]),
        ("settings", {"gamma": 2.0}, ["settings.gamma", "0.5 to 1.0"]), ("settings", {"gamma": float("nan")}, ["settings.gamma"]),
        ("settings", {"gamma": True}, ["settings.gamma"]), ("settings", {"gamma": None}, ["settings.gamma"]),
        ("sampler", 1, ["'sampler'"]), ("sampler", "euler", ["'sampler'"]), ("sampler", "nope", ["'sampler'"]),
        ("space", 1, ["'space'"]), ("space", "x", ["'space'"]), ("space", "flow", ["flow"]),
        ("sigmas", sig.tolist(), ["'sigmas'", "1-D floating-point tensor"]),
        ("sigmas", sig[None], ["'sigmas'", "1-D"]), ("sigmas", sig.long(), ["'sigmas'"]),
        ("sigmas", torch.linspace(0, 10, 100_000, dtype=torch.float64), ["'sigmas'", "100000 values", f"* {REFINE}"]),
        ("sigmas", sig[:3], ["'sigmas'", "3 values"]), ("sigmas", sig.flip(0), ["'sigmas'", "ascending"]),
        ("sigmas", torch.cat([sig[:2], sig[1:2], sig[3:]]), ["'sigmas'", "ascending strictly"]),
        ("sigmas", sig + 0.1, ["'sigmas'", "from 0"]), ("sigmas", torch.where(sig > 1, float("nan"), sig), ["'sigmas'", "finite"]),
        ("sigmas", torch.cat([sig[:-1], sig[-1:] * 10]), ["'sigmas'", "sigma_max"]),
        ("nfe", "3", ["'nfe'"]), ("nfe", -1, ["'nfe'"]), ("nfe", 3.5, ["'nfe'"]), ("nfe", True, ["'nfe'"]),
        ("residuals", "x", ["'residuals'"]), ("residuals", [float("nan")], ["'residuals'"]),
        ("residuals", [-1.0], ["'residuals'"]), ("residuals", [1.0] * 4, ["'residuals'", "at most 3"]),
        ("residuals", ["a"], ["'residuals'"]), ("residuals", None, ["'residuals'"]),
        ("unconverged", "x", ["'unconverged'"]), ("unconverged", [3], ["'unconverged'", "0 to 2"]),
        ("unconverged", [1, 0], ["'unconverged'", "increasing"]), ("unconverged", [0.5], ["'unconverged'"]),
        ("unconverged", [-1], ["'unconverged'"]), ("unconverged", [True], ["'unconverged'"]),
        ("pair", None, ["'pair'", "pair of states"]), ("pair", "x", ["'pair'"]), ("pair", wide, ["'pair'", "(2, 4, 8, 8)"]),
        ("pair", x[:1], ["'pair'"]), ("pair", x.long(), ["'pair'", "floating-point"]), ("pair", nan, ["'pair'", "NaN"]),
        ("trajectory", "x", ["'trajectory'"]), ("trajectory", rec["trajectory"][:3], ["'trajectory'", "4 tensors"]),
        ("trajectory", rec["trajectory"] * 25_000, ["'trajectory'", "100000 item(s)"]),
        ("trajectory", tuple(rec["trajectory"]), ["'trajectory'"]),
        ("trajectory", rec["trajectory"][:3] + [wide], ["'trajectory[3]'", "(2, 4, 8, 9)"]),
        ("trajectory", rec["trajectory"][:3] + [None], ["'trajectory[3]'"]),
        ("trajectory", rec["trajectory"][:3] + [nan], ["'trajectory[3]'", "NaN"]),
        ("trajectory", rec["trajectory"][:3] + [x.long()], ["'trajectory[3]'", "floating-point"]),
        ("source", None, ["'source'"]), ("source", wide, ["'source'"]), ("source", nan, ["'source'"]),
        ("source", x.to(torch.int32), ["'source'"]),
        ("samples", None, ["'samples'"]), ("samples", wide, ["shape", "changed them after Invert"]),
        ("samples", x * 1.01, ["changed after Invert", "pair no longer"]),
        ("cfg", "1", ["'cfg'"]), ("cfg", None, ["'cfg'"]), ("cfg", -0.5, ["'cfg'"]), ("cfg", float("nan"), ["'cfg'"]),
        ("cfg", 1000.0, ["'cfg'"]), ("cfg", True, ["'cfg'"]),
        ("steps", "3", ["'steps'"]), ("steps", 0, ["'steps'"]), ("steps", 3.0, ["'steps'"]), ("steps", 2000, ["'steps'"]),
        ("steps", True, ["'steps'"]), ("steps", 5, ["'sigmas'", "from steps + 1 = 6"]),
        ("scheduler", 3, ["'scheduler'"]), ("scheduler", "", ["'scheduler'"]), ("scheduler", "x" * 1000, ["'scheduler'"]),
        ("denoise", "1", ["'denoise'"]), ("denoise", 0.0, ["'denoise'"]), ("denoise", 1.5, ["'denoise'"]),
        ("denoise", float("nan"), ["'denoise'"]), ("denoise", None, ["'denoise'"]),
        ("model", "SD15", ["'model'"]), ("model", {}, ["'model'"]), ("model", {"prediction": 1, "latent_format": "SD15"}, ["'model'"]),
        ("model", {"prediction": "CONST", "latent_format": "SD15"}, ["made with a CONST model", "this model is EPS"]),
        ("model", {"prediction": "EPS", "latent_format": "SDXL"}, ["SDXL latents"]),
        ("budget", "30", ["'budget'"]), ("budget", -1, ["'budget'"]), ("budget", 3.5, ["'budget'"]),
        ("budget", True, ["'budget'"]),
        ("split", "x", ["'split'"]), ("split", [3], ["'split'", "0 to 2"]), ("split", [1, 0], ["'split'"]),
        ("split", [0.5], ["'split'"]), ("split", None, ["'split'"]),
        ("kept_ddim", [3], ["'kept_ddim'", "0 to 2"]), ("kept_ddim", [-1], ["'kept_ddim'"]),
        ("kept_ddim", "x", ["'kept_ddim'"]),
        ("costs", "x", ["'costs'"]), ("costs", [float("nan")], ["'costs'"]), ("costs", [-1.0], ["'costs'"]),
        ("costs", [1.0] * 4, ["'costs'", "at most 3"]),
        ("roundtrip", "x", ["'roundtrip'"]), ("roundtrip", -1.0, ["'roundtrip'"]),
        ("roundtrip", float("nan"), ["'roundtrip'"]), ("roundtrip", True, ["'roundtrip'"]),
        ("summary", 3, ["'summary'"]), ("summary", "x" * 5000, ["'summary'", "4096"]), ("summary", None, ["'summary'"]),
    ]
    return out


# Fields added to format 1 after its first files were written: the solvers' and the host's with a default.
LATER = {*SOLVER_LATER, *(f.name for f in Record.host_fields()
                          if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)}
KEYS_OF_A_RECORD = {"format", *(KEYS.get(f.name, f.name) for f in dataclasses.fields(Inversion)),
                    *(f.name for f in Record.host_fields())}


MISSING = object()


def corrupt(latent, field, value):
    rec = dict(latent["inversion"])
    if value is MISSING:
        del rec[field]
    else:
        rec[field] = value
    return dict(latent, inversion=rec)


def test_every_wrong_field_is_refused_before_any_model_call():
    model, calls = counting()
    good = invert(model)
    assert set(good["inversion"]) == KEYS_OF_A_RECORD
    table = cases(good["inversion"])
    fields = {f for f, _, _ in table}
    assert fields == set(good["inversion"])  # every field is made wrong
    calls[0] = 0
    for i, (field, value, words) in enumerate(table):
        bad = corrupt(good, field, value)
        for where, run in (("Reconstruct", lambda: reconstruct(model, bad)),
                           ("LoadInversion", lambda: load(model, write(bad, f"case{i}.safetensors")))):
            with pytest.raises(NodeInputError) as e:
                run()
            message = str(e.value)
            what = "inverted" if where == "Reconstruct" else "inversion"
            assert (message.startswith(f"{where}: input '{what}': ")
                    or message.startswith(f"{where}: input 'model': ") and field == "model"), (field, value, message)
            for w in words:
                assert w in message, (where, field, value, message)
    assert calls[0] == 0
    assert torch.allclose(reconstruct(model, good)["samples"], good["inversion"]["source"], atol=1e-5)  # the base is fine
    assert calls[0] == 2  # BDIA resumes from its pair: steps - 1 calls


@pytest.mark.parametrize("method", ("aidi_anderson", "edict"))
def test_pair_rules_of_other_samplers(method):
    model, calls = counting()
    good = invert(model, method)
    x = good["samples"]
    bad = [("pair", x.clone(), "'pair' must be None")] if method == "aidi_anderson" else [("pair", None, "pair of states")]
    bad += [("residuals", good["inversion"]["residuals"] + [0.1], "'residuals'")] if method == "aidi_anderson" else []
    calls[0] = 0
    for field, value, words in bad:
        with pytest.raises(NodeInputError, match=f"Reconstruct: input 'inverted': .*{words}"):
            reconstruct(model, corrupt(good, field, value))
    assert calls[0] == 0
    without = corrupt(good, "trajectory", None)  # keep_trajectory off is legitimate
    assert Record.read("t", without, "inverted", model).inv.trajectory is None


SETTINGS = {  # method: (setting, wrong value, words)
    "aidi_anderson": [("iterations", "5", "an integer"), ("iterations", 2.5, "an integer"), ("tol", -1.0, "a number"),
                      ("guess", "x", "one of ddim, extrapolate"), ("m", None, "an integer"), ("lam", float("inf"), "a number")],
    "renoise": [("window", [3], "2 integers"), ("window", "3,5", "2 integers"), ("window", [3, -5], "2 integers"),
                ("first_window", [0.5, 5], "2 integers")],
    "easyinv": [("eta", "0.5", "a number"), ("start", True, "a number")],
    "edict": [("p", 0.1, "a number from 0.5 to 1.0"), ("p", "0.93", "a number from 0.5 to 1.0")],
}


@pytest.mark.parametrize("method", list(SETTINGS))
def test_wrong_settings_of_every_kind_are_refused(method):
    model, calls = counting()
    good = invert(model, method, keep_trajectory=False)
    calls[0] = 0
    for key, value, words in SETTINGS[method]:
        bad = corrupt(good, "settings", dict(good["inversion"]["settings"], **{key: value}))
        with pytest.raises(NodeInputError, match=f"Reconstruct: input 'inverted': .*'settings.{key}' must be {words}"):
            reconstruct(model, bad)
    assert calls[0] == 0


def test_a_file_whose_latent_is_wrong_is_refused():
    model, calls = counting()
    good = invert(model)
    calls[0] = 0
    x = good["samples"]
    for i, (samples, words) in enumerate(((None, "expected a LATENT"), (x[0], "4D"), (x[:, :, None], "5D samples"),
                                          (x[:, :3], "channels"), (x.long(), "floating-point"),
                                          (x * float("nan"), "NaN"), (x[:0], "is empty"))):
        latent = dict(good, samples=samples) if samples is not None else {"inversion": good["inversion"]}
        with pytest.raises(NodeInputError, match=f"LoadInversion: input 'inversion': .*{words}"):
            load(model, write(latent, f"latent{i}.safetensors"))
    assert calls[0] == 0


def test_a_refined_schedule_up_to_the_stated_factor_is_accepted():
    model, _ = counting()
    good = invert(model, "aidi_anderson", steps=1)
    top = float(good["inversion"]["sigmas"][-1])
    for n, ok in ((1 + REFINE, True), (2 + REFINE, False)):
        sig = torch.linspace(0, top, n, dtype=torch.float64)
        rec = corrupt(corrupt(good, "sigmas", sig), "trajectory", None)
        if ok:
            assert Record.read("t", rec, "inverted", model).inv.sigmas.numel() == n
        else:
            with pytest.raises(NodeInputError, match="'sigmas' must be from steps"):
                Record.read("t", rec, "inverted", model)


def test_a_record_that_is_not_a_dict_and_one_from_another_space():
    model, calls = counting()
    good = invert(model)
    calls[0] = 0
    for value in ("x", None, [1]):
        with pytest.raises(NodeInputError, match="Reconstruct: input 'inverted': carries no inversion record"):
            reconstruct(model, dict(good, inversion=value))
    flow = exact_model("flow", MIX)
    made = invert(flow, scheduler="simple")
    assert calls[0] == 0
    # A flow record relabelled as an EPS one: space and schedule (sigma up to 1) disagree with the model.
    relabelled = corrupt(made, "model", {"prediction": "EPS", "latent_format": "SD15"})
    with pytest.raises(NodeInputError, match="space 'flow' but this model samples in 'eps'"):
        reconstruct(model, relabelled)
    assert calls[0] == 0


# --- the record type --------------------------------------------------------------------------

def test_the_record_reads_back_what_invert_wrote_and_shares_its_tensors():
    model, _ = counting()
    out = invert(model)
    rec = Record.read("t", out, "inverted", model)
    inv = rec.inv
    assert inv.method == "bdia" and inv.sampler == "bdia" and inv.space == "eps" and inv.base_steps == 3
    assert inv.settings == {"gamma": 0.94} and rec.cfg == 1.0 and rec.denoise == 1.0 and rec.scheduler == "karras"
    assert rec.model == {"prediction": "EPS", "latent_format": "SD15"} and inv.nfe == 3
    assert inv.sigmas.dtype == torch.float32 and inv.sigmas.numel() == 4  # as the solver used them
    # One copy of each state: the ends are the source and the output, BDIA's pair is the state before the last.
    assert inv.latent is out["samples"] and inv.trajectory[-1] is out["samples"]
    assert inv.trajectory[0] is rec.source and inv.pair is inv.trajectory[-2]
    assert rec.as_dict().keys() == out["inversion"].keys()
    assert all(rec.as_dict()[k] is out["inversion"][k] for k in out["inversion"] if k != "format")
    saved = SaveInversion.execute(latent=out, filename_prefix="same").ui["latents"][0]
    shutil.copy(os.path.join(folder_paths.get_output_directory(), saved["filename"]), folder_paths.get_input_directory())
    with safetensors.safe_open(os.path.join(folder_paths.get_input_directory(), saved["filename"]), framework="pt") as f:
        assert len(f.keys()) == 5  # sigmas, source, the two states between, samples: each stored once
    back = Record.read("t", load(model, saved["filename"]), "inverted", model)
    t = back.inv.trajectory
    assert t[0] is back.source and t[-1] is back.inv.latent and back.inv.pair is t[-2]
    assert rec.cfg_for("N", "cfg", -1) == 1.0 and rec.cfg_for("N", "cfg", 0) == 0.0
    for wrong in (-0.5, -1.5, float("nan")):
        with pytest.raises(NodeInputError, match=r"N: input 'cfg': expected -1 \(the inversion's cfg, 1\)"):
            rec.cfg_for("N", "cfg", wrong)


@pytest.mark.parametrize("method", ("bdia", "aidi_anderson"))
def test_files_written_before_the_record_type_still_load(method):
    """tests/data holds files the previous SaveInversion wrote (format 1, Invert before this type)."""
    model, _ = counting()
    name = f"format1_{method}.safetensors"
    shutil.copy(DATA / name, folder_paths.get_input_directory())
    loaded = load(model, name)
    rec = Record.read("t", loaded, "inverted", model)
    assert rec.inv.method == method and loaded["batch_index"] == [3, 4] and rec.inv.latent is loaded["samples"]
    back = reconstruct(model, loaded)["samples"]
    assert torch.isfinite(back).all()
    if method == "bdia":  # unchanged since the file was written: the same inversion, made again today
        fresh = invert(model, method)
        for k, v in fresh["inversion"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, loaded["inversion"][k]), k
        assert torch.equal(back, reconstruct(model, fresh)["samples"])
    else:  # AIDI-A has a budget and splits steps since (issue 11): the old record resumes as saved,
        # and saved again today it comes back the same
        again = load(model, write(loaded, "again.safetensors"))
        assert torch.equal(reconstruct(model, again)["samples"], back)


def test_a_field_added_later_with_a_default_reads_older_records():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Later(Record):
        refined: list = field(default_factory=list)

    model, _ = counting()
    shutil.copy(DATA / "format1_bdia.safetensors", folder_paths.get_input_directory())
    old = load(model, "format1_bdia.safetensors")
    assert Later.read("t", old, "inverted", model).refined == []
    assert Later.read("t", corrupt(old, "refined", [1]), "inverted", model).refined == [1]
    with pytest.raises(NodeInputError, match="t: input 'inverted': its inversion record lacks cfg"):
        Later.read("t", corrupt(old, "cfg", MISSING), "inverted", model)


# --- LoadInversion: where a file may come from ---------------------------------------------------

def nowhere(name):
    return f"LoadInversion: input 'inversion': {files.nowhere(name)}"


def refused_as_missing(model, name):
    with pytest.raises(NodeInputError) as e:
        load(model, name)
    assert str(e.value) == nowhere(name)
    assert LoadInversion.validate_inputs(inversion=name) == nowhere(name)
    assert LoadInversion.fingerprint_inputs(inversion=name) == ""


def test_files_outside_the_input_folder_are_refused_like_missing_ones(tmp_path):
    model, calls = counting()
    inp = pathlib.Path(folder_paths.get_input_directory())
    outside = tmp_path / "outside"
    outside.mkdir()
    good = invert(model)
    calls[0] = 0
    write(good, "ok.safetensors")
    shutil.move(inp / "ok.safetensors", outside / "secret.safetensors")
    (inp / "sub").mkdir()
    write(good, "sub/inner.safetensors")
    os.symlink(outside / "secret.safetensors", inp / "link.safetensors")
    os.symlink(outside, inp / "linkdir")
    os.symlink(inp / "sub" / "inner.safetensors", inp / "inside_link.safetensors")
    os.symlink(inp / "gone.safetensors", inp / "dangling.safetensors")
    (inp / "dir.safetensors").mkdir()
    os.mkfifo(inp / "fifo.safetensors")
    for name in ("../outside/secret.safetensors", str(outside / "secret.safetensors"), "link.safetensors",
                 "linkdir/secret.safetensors", "sub/../../outside/secret.safetensors", "nowhere.safetensors",
                 "dangling.safetensors", "dir.safetensors", "fifo.safetensors", "sub/../ok.safetensors",
                 "secret.txt", "a\0b.safetensors", "", ".safetensors", "sub/"):
        refused_as_missing(model, name)
    for name in ("sub/inner.safetensors", "inside_link.safetensors", "./sub/../sub/inner.safetensors"):
        assert torch.equal(load(model, name)["samples"], good["samples"])
        assert LoadInversion.validate_inputs(inversion=name) is True
    assert calls[0] == 0


class Reads:
    """Counts the bytes LoadInversion's module reads through open()."""

    def __init__(self, monkeypatch):
        self.n = 0
        outer = self

        class Counted:
            def __init__(self, f):
                self.f = f

            def read(self, *a):
                data = self.f.read(*a)
                outer.n += len(data)
                return data

            def __getattr__(self, k):
                return getattr(self.f, k)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return self.f.__exit__(*a)

        monkeypatch.setattr(files, "open", lambda *a, **k: Counted(builtins.open(*a, **k)), raising=False)


def test_a_huge_header_is_refused_before_it_is_read(monkeypatch):
    model, _ = counting()
    path = os.path.join(folder_paths.get_input_directory(), "huge.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, path, metadata={"pad": "x" * (files.MAX_HEADER + 10)})
    reads = Reads(monkeypatch)
    with pytest.raises(NodeInputError, match=r"'huge.safetensors' is truncated or corrupt: its header is \d+ bytes, more than"):
        load(model, "huge.safetensors")
    assert reads.n == 8
    monkeypatch.setattr(files, "MAX_HEADER", 1000)
    with pytest.raises(NodeInputError, match="SaveInversion: input 'latent': its file header would be about"):
        SaveInversion.execute(latent=invert(model), filename_prefix="x")


def test_the_change_check_reads_the_header_only(monkeypatch):
    model, _ = counting()
    name = write(invert(model), "a.safetensors")
    path = os.path.join(folder_paths.get_input_directory(), name)
    size = os.path.getsize(path)
    head = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    reads = Reads(monkeypatch)
    first = LoadInversion.fingerprint_inputs(inversion=name)
    assert reads.n == head < size and first == LoadInversion.fingerprint_inputs(inversion=name)
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1  # a tensor byte: same size, new time
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    second = LoadInversion.fingerprint_inputs(inversion=name)
    assert second != first
    with open(path, "ab") as f:
        f.write(b" ")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert LoadInversion.fingerprint_inputs(inversion=name) not in (first, second)


def test_loaded_extras_are_checked():
    model, _ = counting()
    good = invert(model)
    for key, value, words in (("batch_index", [1], "'batch_index'"), ("batch_index", "x", "'batch_index'"),
                              ("noise_mask", "x", "'noise_mask'"), ("noise_mask", torch.full((1, 8, 8), float("nan")), "'noise_mask'")):
        with pytest.raises(NodeInputError, match=f"LoadInversion: input 'inversion': .*{words}"):
            load(model, write(dict(good, **{key: value}), f"{key}.safetensors"))


def test_broken_json_and_tensor_tables_are_refused():
    model, _ = counting()
    good = invert(model)
    tensors, content = encode("t", good)
    inp = folder_paths.get_input_directory()
    variants = {"deep": "[" * 100_000 + "]" * 100_000, "nojson": "{", "unknown": content.replace('"t0"', '"t99"'),
                "listkey": content.replace('"t0"', '["t0"]', 1)}
    for name, text in variants.items():
        meta = {files.VERSION_KEY: "1", files.CONTENT_KEY: text}
        safetensors.torch.save_file(tensors, os.path.join(inp, f"{name}.safetensors"), metadata=meta)
        with pytest.raises(NodeInputError, match=f"LoadInversion: input 'inversion': '{name}.safetensors' is "
                                                 "(truncated or corrupt|damaged)"):
            load(model, f"{name}.safetensors")


# --- the other holes --------------------------------------------------------------------------

def test_bdia_with_one_step_is_refused():
    model, calls = counting()
    with pytest.raises(NodeInputError, match="Invert: input 'steps': bdia needs at least 2 steps"):
        invert(model, "bdia", steps=1)
    two = invert(model, "bdia", steps=2)
    calls[0] = 0
    sig = two["inversion"]["sigmas"]
    one = corrupt(corrupt(corrupt(two, "sigmas", sig[::2]), "steps", 1), "trajectory", None)
    with pytest.raises(NodeInputError, match="Reconstruct: input 'inverted': is a BDIA inversion of 1 step"):
        reconstruct(model, one)
    assert calls[0] == 0


def test_noise_masks_are_refused_not_ignored():
    model, calls = counting()
    source = {"samples": vae_scale(model, MIX.sample(1, seed=4).float())}
    masked = core.SetLatentNoiseMask().set_mask(source, torch.ones(1, 64, 64))[0]
    with pytest.raises(NodeInputError, match="Invert: input 'latent': carries a noise_mask .* does not use"):
        Invert.execute(model=model, latent=masked, positive=prompt(1), method="ddim", steps=3, scheduler="karras",
                       cfg=1.0, denoise=1.0, keep_trajectory=False)
    good = invert(model)
    calls[0] = 0
    after = core.SetLatentNoiseMask().set_mask(good, torch.ones(1, 64, 64))[0]
    assert "inversion" in after
    with pytest.raises(NodeInputError, match="Reconstruct: input 'inverted': carries a noise_mask"):
        reconstruct(model, after)
    assert calls[0] == 0


def test_cfg_minus_one_is_the_only_sentinel():
    model, calls = counting()
    good = Invert.execute(model=model, latent={"samples": vae_scale(model, MIX.sample(1, seed=4).float())},
                          positive=prompt(1), negative=prompt(0), method="bdia", steps=4, scheduler="karras", cfg=2.0,
                          denoise=1.0, keep_trajectory=False).result[0]
    calls[0] = 0
    for cfg in (-0.5, -0.01, -2.0):
        with pytest.raises(NodeInputError, match=r"Reconstruct: input 'cfg': expected -1 \(the inversion's cfg, 2\)"):
            reconstruct(model, good, cfg)
    with pytest.raises(NodeInputError, match="Invert: input 'cfg'"):
        invert(model, cfg=-0.5)
    assert calls[0] == 0
    run = lambda cfg: Reconstruct.execute(model=model, inverted=good, positive=prompt(1), negative=prompt(0),
                                          cfg=cfg).result[0]["samples"]
    assert torch.equal(run(-1.0), run(2.0)) and not torch.equal(run(-1.0), run(1.0))


def video_model():
    """The exact mixture behind a model whose latent format is a video one (Wan 2.1: 16 channels, 5D),
    with its count of network evaluations (``comfy_host.counted``)."""
    import comfy.latent_formats

    mix = Mixture((16, 2, 8, 8), components=2, seed=1)
    model = exact_model("flow", mix)
    model.model.latent_format = comfy.latent_formats.Wan21()
    return (*comfy_host.counted(model), mix)


def test_latents_of_the_wrong_dimensionality_are_refused_before_any_call():
    model, calls = counting()
    five = {"samples": torch.zeros(1, 4, 2, 8, 8)}
    with pytest.raises(NodeInputError, match=r"Invert: input 'latent': has 5D samples .* an image model's \(SD15"):
        Invert.execute(model=model, latent=five, positive=prompt(1), method="ddim", steps=3, scheduler="karras",
                       cfg=1.0, denoise=1.0, keep_trajectory=False)
    video, video_calls, mix = video_model()
    with pytest.raises(NodeInputError, match=r"Invert: input 'latent': has 4D samples .* a video model's \(Wan21"):
        Invert.execute(model=video, latent={"samples": torch.zeros(1, 16, 8, 8)}, positive=prompt(1), method="ddim",
                       steps=3, scheduler="simple", cfg=1.0, denoise=1.0, keep_trajectory=False)
    assert calls[0] == 0 and video_calls[0] == 0
    # and a video latent on the video model runs, and returns
    src = {"samples": vae_scale(video, mix.sample(1, seed=2).float())}
    out = Invert.execute(model=video, latent=src, positive=prompt(1), method="bdia", steps=4, scheduler="simple",
                         cfg=1.0, denoise=1.0, keep_trajectory=True).result[0]
    back = Reconstruct.execute(model=video, inverted=out, positive=prompt(1), cfg=-1.0).result[0]["samples"]
    assert back.shape == (1, 16, 2, 8, 8) and ((back - src["samples"]).norm() / src["samples"].norm()) < 1e-5


def test_solver_errors_carry_one_prefix_and_are_not_input_errors():
    model, _ = counting()
    good = invert(model)
    model.set_model_unet_function_wrapper(lambda apply_model, args: args["input"] * float("nan"))
    with pytest.raises(NonFiniteError) as e:  # step 1 comes from BDIA's pair: step 2 is the first call
        reconstruct(model, good)
    assert str(e.value) == "Reconstruct: bdia: the denoiser returned non-finite values at step 2 (sigma = 1.2741)"

    def job(den, x, inner):
        raise SolverError("Reconstruct: already named")
    with pytest.raises(SolverError) as e:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(prompt(1), prompt(0))
        guider.set_cfg(1.0)
        run_guider("Reconstruct", guider, good["samples"], good["inversion"]["sigmas"].flip(0), job)
    assert str(e.value) == "Reconstruct: already named"


def test_save_inversion_declares_the_workflow_and_stores_it(monkeypatch):
    from comfy_api.latest import io

    # Declared, not left to the host (both hosts also add them to any output node today).
    assert SaveInversion.define_schema().hidden == [io.Hidden.prompt, io.Hidden.extra_pnginfo]
    assert {"prompt", "extra_pnginfo"} <= set(SaveInversion.INPUT_TYPES()["hidden"])
    model, _ = counting()
    made = invert(model)

    class Made:  # hands the inverted LATENT to the graph
        CATEGORY, RETURN_TYPES, FUNCTION = "test", ("LATENT",), "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (made,)

    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "TestMade", Made)
    monkeypatch.setitem(core.NODE_CLASS_MAPPINGS, "InversionSuite_SaveInversion", SaveInversion)
    graph = {"1": {"class_type": "TestMade", "inputs": {}},
             "2": {"class_type": "InversionSuite_SaveInversion", "inputs": {"latent": ["1", 0], "filename_prefix": "wf"}}}
    workflow = {"nodes": [{"id": 1}, {"id": 2}], "links": []}

    ex = comfy_host.execute_graph(graph, {"extra_pnginfo": {"workflow": workflow}})
    assert ex.success, ex.status_messages
    saved = ex.history_result["outputs"]["2"]["latents"][0]
    path = os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["prompt"]) == graph and json.loads(meta["workflow"]) == workflow


def test_damaged_bytes_give_a_refusal_or_a_valid_record_never_a_raw_error():
    """Flip, drop or overwrite bytes of a real file, header and data alike (seeded)."""
    model, calls = counting()
    name = write(invert(model), "good.safetensors")
    data = open(os.path.join(folder_paths.get_input_directory(), name), "rb").read()
    head = 8 + int.from_bytes(data[:8], "little")
    g = torch.Generator().manual_seed(0)
    calls[0] = 0
    refused = 0
    for i in range(300):
        b = bytearray(data)
        at = int(torch.randint(head if i % 2 else len(b), (1,), generator=g))  # odd: inside the header
        if i % 5 == 0:
            b = b[:at]
        else:
            b[at] = int(torch.randint(256, (1,), generator=g))
        path = os.path.join(folder_paths.get_input_directory(), "damaged.safetensors")
        open(path, "wb").write(bytes(b))
        try:
            Record.read("t", load(model, "damaged.safetensors"), "inverted", model)
        except NodeInputError as e:
            assert str(e).startswith("LoadInversion: input '"), str(e)
            refused += 1
    assert calls[0] == 0 and refused > 150


# --- hostile files and odd inputs ------------------------------------------------------------------

def test_a_huge_batch_index_is_refused_at_load():
    """The host's prepare_noise loops up to the largest batch_index without an interrupt check: a file
    holding 10**30 would hang the executor. No graph makes an index past EmptyLatentImage's 4096."""
    model, calls = counting()
    good = invert(model)
    calls[0] = 0
    for index in ([10 ** 30, 0], [10 ** 6, 1], [files.MAX_BATCH, 0]):
        with pytest.raises(NodeInputError, match="LoadInversion: input 'inversion': .*'batch_index' must be a list of 2 "
                                                 "integers from 0 to 4095"):
            load(model, write(dict(good, batch_index=index), "index.safetensors"))
    assert load(model, write(dict(good, batch_index=[files.MAX_BATCH - 1, 0]), "ok.safetensors"))["batch_index"][0] == 4095
    assert calls[0] == 0


def test_a_folder_flipping_to_a_link_out_never_yields_the_outside_file(tmp_path):
    """A folder on the file's path flips between a real folder in the input folder and a link out of
    it (another process, for up to 20 s), while LoadInversion loads through it 2000 times: what loads is
    the inside file, or a refusal, never the outside one. Before the file was opened once and located
    (the name was checked, then opened twice), 2 and 17 of 2000 loads read the outside file."""
    import subprocess
    import sys
    import time
    model, _ = counting()
    inp, outside = pathlib.Path(folder_paths.get_input_directory()), tmp_path / "outside"
    (inp / "flip").mkdir()
    outside.mkdir()
    inside = invert(model)
    write(inside, "flip/a.safetensors")
    write(dict(inside, samples=inside["samples"] + 1), "evil.safetensors")  # only its samples differ
    shutil.move(inp / "evil.safetensors", outside / "a.safetensors")
    flip, saved = str(inp / "flip"), str(inp / "saved")
    code = (f"import os, time\nend = time.monotonic() + 20\nwhile time.monotonic() < end:\n"
            f"    os.rename({flip!r}, {saved!r}); os.symlink({str(outside)!r}, {flip!r}); time.sleep(0.0003)\n"
            f"    os.unlink({flip!r}); os.rename({saved!r}, {flip!r}); time.sleep(0.0003)\n")
    flipper = subprocess.Popen([sys.executable, "-c", code])
    loaded = refused = 0
    try:
        while flipper.poll() is None and loaded + refused < 2000:
            try:
                got = files.read("t", "inversion", "flip/a.safetensors")
            except NodeInputError:
                refused += 1
                continue
            assert torch.equal(got["samples"], inside["samples"]), "the outside file was read"
            loaded += 1
    finally:
        flipper.kill()
        flipper.wait()
        time.sleep(0.01)
    assert loaded > 0 and refused > 0  # both sides of the flip were met


def sparse_bomb(path, good, gib=1):
    """An inversion file whose LATENT samples are a ``gib`` GiB tensor of a sparse file (holes read as
    zeros, a few KiB on disk), beside the small record that Invert made."""
    tensors, content = encode("t", good)
    c = json.loads(content)
    c["samples"] = {"__tensor__": "tbig"}
    head, at, blobs = {}, 0, []
    for k, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        head[k] = {"dtype": {torch.float32: "F32", torch.float64: "F64"}[t.dtype], "shape": list(t.shape),
                   "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    n = gib * 2 ** 30
    head["tbig"] = {"dtype": "F32", "shape": [n // (4 * 4 * 64 * 64), 4, 64, 64], "data_offsets": [at, at + n]}
    head["__metadata__"] = {files.VERSION_KEY: "1", files.CONTENT_KEY: json.dumps(c)}
    text = json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
        f.truncate(8 + len(text) + at + n)


BOMB_RUN = """
import resource, runpy, sys
sys.path.insert(0, {tests!r})
runpy.run_path({pack!r})["load"]()
import comfy_host, folder_paths
from analytic import Mixture
from inversion_suite.nodes.host.inputs import NodeInputError
from inversion_suite.nodes.save_load import LoadInversion
folder_paths.input_directory = {inp!r}
model = comfy_host.exact_model("eps", Mixture((4, 8, 8), components=3, seed=0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    LoadInversion.execute(model=model, inversion="bomb.safetensors")
    print("LOADED")
except NodeInputError as e:
    print("REFUSED", e)
print("GROWTH_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_sparse_bomb_is_refused_from_its_header_in_bounded_memory():
    """Its header names a 1 GiB samples tensor: refused from the header, before any tensor is read;
    the process's peak memory grows by less than 64 MiB (it read the header, a few KiB)."""
    import subprocess
    import sys
    model, _ = counting()
    inp = folder_paths.get_input_directory()
    sparse_bomb(os.path.join(inp, "bomb.safetensors"), invert(model))
    tests = str(pathlib.Path(__file__).parent)
    script = BOMB_RUN.format(tests=tests, pack=str(pathlib.Path(tests).parent / "benchmarks" / "pack.py"), inp=inp)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, COMFYUI_PATH=str(comfy_host.path())))
    assert "REFUSED LoadInversion: input 'inversion': its samples have shape (16384, 4, 64, 64)" in out.stdout, \
        out.stdout + out.stderr[-2000:]
    growth = int(out.stdout.split("GROWTH_KIB")[1])
    assert growth < 64 * 1024, f"peak memory grew by {growth} KiB"


def test_the_editors_refuse_a_noise_mask_they_would_ignore():
    model, calls = counting()
    good = invert(model)
    masked = core.SetLatentNoiseMask().set_mask(good, torch.ones(1, 64, 64))[0]
    calls[0] = 0
    mask = torch.ones(1, 64, 64)
    with pytest.raises(NodeInputError, match="BlendedGuidanceSampler: input 'inverted': carries a noise_mask"):
        BlendedGuidanceSampler.execute(model=model, inverted=masked, source=prompt(1), target=prompt(2),
                                       cfg_inversion=-1.0, cfg_edit=5.0, mask_steps=1.0, local_blend=True, mask=mask)
    with pytest.raises(NodeInputError, match="StochasticEditSampler: input 'inverted': carries a noise_mask"):
        StochasticEditSampler.execute(model=model, inverted=masked, source=prompt(1), target=prompt(2), cfg=5.0,
                                      eta=1.0, seed=0, count=2, mask=mask)
    assert calls[0] == 0


def test_a_schedule_longer_than_the_solver_writes_is_refused():
    """The implicit loop splits a step into at most 2**DEPTH = 16: no record holds more sigmas than that."""
    model, calls = counting()
    good = invert(model, "aidi_anderson", steps=3)
    top = float(good["inversion"]["sigmas"][-1])
    calls[0] = 0
    long = corrupt(corrupt(corrupt(good, "steps", 1000), "trajectory", None),
                   "sigmas", torch.linspace(0, top, 256_001, dtype=torch.float64))
    for run in (lambda: reconstruct(model, long), lambda: load(model, write(long, "long.safetensors"))):
        with pytest.raises(NodeInputError, match=r"'sigmas' must be from steps \+ 1 = 1001 to 1 \+ steps \* 16 = "
                                                 r"16001 long, got 256001 values"):
            run()
    assert REFINE == 16 and calls[0] == 0


def test_float8_latents_are_refused_by_name():
    model, calls = counting()
    good = invert(model)
    calls[0] = 0
    x8 = good["samples"].to(torch.float8_e4m3fn)
    with pytest.raises(NodeInputError, match="Invert: input 'latent': expected floating-point samples .*float8_e4m3fn"):
        run_invert(model, {"samples": x8}, prompt(1), "ddim")
    with pytest.raises(NodeInputError, match="Reconstruct: input 'inverted': expected floating-point samples"):
        reconstruct(model, dict(good, samples=x8))
    stored = dict(good, samples=x8, inversion=dict(good["inversion"], samples=x8, trajectory=None))
    with pytest.raises(NodeInputError, match="LoadInversion: input 'inversion': .*float8_e4m3fn|F8_E4M3"):
        load(model, write(stored, "f8.safetensors"))
    assert calls[0] == 0


def test_renoise_regularisation_on_a_flow_model_is_refused_before_any_call():
    model, calls = counting("flow")
    source = {"samples": vae_scale(model, MIX.sample(1, seed=4).float())}
    calls[0] = 0
    with pytest.raises(SolverError, match="Invert: renoise: the noise regularisation .* on a flow model set "
                                          "reg_steps to 0"):
        run_invert(model, source, prompt(1), "renoise", 3, "simple", reg_steps=2)
    assert calls[0] == 0
