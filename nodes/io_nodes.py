"""SaveInversion / LoadInversion: an inverted LATENT, record and all, in one .safetensors file.

Tensors are stored by safetensors; everything else (the LATENT's structure, the record's
numbers and strings) is JSON in the file's metadata, with each tensor written as
``{"__tensor__": key}``. A tensor reached twice (the LATENT's samples and the record's
``samples``) is stored once and comes back as one object, so Reconstruct still sees
untouched samples. No pickle: the file cannot run code when loaded.
"""

import hashlib
import json
import os

import folder_paths
import safetensors.torch
import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..solvers import SAMPLERS, SPACES
from .host import FORMAT, RECORD, check_latent, fail, record_of

FILE_FORMAT = 1
VERSION_KEY = "inversion_suite_format"
CONTENT_KEY = "inversion_suite_latent"
TENSOR, TUPLE = "__tensor__", "__tuple__"
EXTENSION = ".safetensors"
# What Invert writes and Reconstruct and the editors read.
FIELDS = ("format", "method", "settings", "sampler", "space", "sigmas", "nfe", "residuals", "unconverged", "pair",
          "trajectory", "source", "samples", "cfg", "steps", "scheduler", "denoise", "model")


PLAIN = "connect the output of Invert (for a plain latent use the core SaveLatent / LoadLatent nodes)"
DAMAGED = "the file is damaged or was not written by SaveInversion"


def check_record(node: str, latent, what: str, hint: str = PLAIN) -> dict:
    """The record's shape, checked without a model: the fields Reconstruct relies on, typed."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        fail(node, what, "expected a LATENT (a dict with a 'samples' tensor)")
    rec = latent.get(RECORD)
    if not isinstance(rec, dict):
        fail(node, what, f"carries no inversion record: {hint}")
    if rec.get("format") != FORMAT:
        fail(node, what, f"its inversion record has format {rec.get('format')!r}; this version reads {FORMAT}")
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        fail(node, what, f"its inversion record lacks {', '.join(missing)}: {hint}")
    traj = rec["trajectory"]
    ok = (all(isinstance(rec[k], torch.Tensor) for k in ("sigmas", "source", "samples"))
          and (rec["pair"] is None or isinstance(rec["pair"], torch.Tensor))
          and (traj is None or isinstance(traj, list) and all(isinstance(t, torch.Tensor) for t in traj))
          and rec["sampler"] in SAMPLERS and rec["space"] in SPACES and isinstance(rec["settings"], dict)
          and isinstance(rec["model"], dict) and {"prediction", "latent_format"} <= rec["model"].keys())
    if not ok:
        fail(node, what, "its inversion record is malformed (expected tensors for sigmas, source and samples, "
                         f"a known sampler ({', '.join(SAMPLERS)}) and space ({', '.join(SPACES)}))")
    return rec


def encode(node: str, latent: dict):
    """(tensors by key, JSON text) for a LATENT; refuses values JSON and safetensors cannot hold."""
    tensors, keys, storages = {}, {}, set()

    def walk(v, where):
        if isinstance(v, torch.Tensor):
            if id(v) not in keys:
                t = v.detach().cpu().contiguous()
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr in storages:  # safetensors refuses two names on one storage
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                keys[id(v)] = key = f"t{len(keys)}"
                tensors[key] = t
            return {TENSOR: keys[id(v)]}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v) or TENSOR in v or TUPLE in v:
                fail(node, "latent", f"{where} has keys an inversion file cannot store (strings expected)")
            return {k: walk(x, f"{where}.{k}") for k, x in v.items()}
        if isinstance(v, tuple):
            return {TUPLE: [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        fail(node, "latent", f"{where} is a {type(v).__name__}, which an inversion file cannot store")

    # keys must stay alive while walking: they are, as parts of ``latent``
    return tensors, json.dumps(walk(latent, "latent"))


def decode(content, tensors: dict):
    def walk(v):
        if isinstance(v, dict):
            if set(v) == {TENSOR}:
                return tensors[v[TENSOR]]  # same key, same object
            if set(v) == {TUPLE}:
                return tuple(walk(x) for x in v[TUPLE])
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    return walk(content)


def read(node: str, what: str, name: str, path: str) -> dict:
    """The LATENT stored in ``path``, with a clear refusal for anything that is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(node, what, f"cannot read {name!r}: {e}")
    bad = f"{name!r} is truncated or corrupt"
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or 8 + size > len(data):
        fail(node, what, f"{bad}: its safetensors header is incomplete (expected a file from SaveInversion)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        header = None
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        fail(node, what, f"{bad}: its safetensors header is not valid")
    if VERSION_KEY not in meta:
        if "latent_tensor" in header:
            fail(node, what, f"{name!r} is a plain latent from the core SaveLatent node, not an inversion: load it "
                             "with LoadLatent and run Invert, or save Invert's output with SaveInversion")
        fail(node, what, f"{name!r} is not an inversion file (no '{VERSION_KEY}' in its metadata); "
                         "expected a file written by SaveInversion")
    try:
        version = int(meta[VERSION_KEY])
    except (TypeError, ValueError):
        fail(node, what, f"{bad}: format version {meta[VERSION_KEY]!r} is not a number")
    if version > FILE_FORMAT:
        fail(node, what, f"{name!r} has inversion file format {version}, newer than this Inversion Suite reads "
                         f"(up to {FILE_FORMAT}): update the pack")
    if version < 1:
        fail(node, what, f"{bad}: format version {version} does not exist")
    try:
        tensors = safetensors.torch.load(data)
        latent = decode(json.loads(meta[CONTENT_KEY]), tensors)
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        fail(node, what, f"{bad}: {type(e).__name__}: {e}")
    return latent


def input_files():
    folder = folder_paths.get_input_directory()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(EXTENSION) and os.path.isfile(os.path.join(folder, f)))


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_SaveInversion",
            display_name="Save Inversion",
            category="sampling/inversion",
            description="Saves an inverted LATENT with everything Invert recorded (schedule, method, settings, "
                        "pair, trajectory, source, residuals, model) to one .safetensors file in the output "
                        "folder, so Reconstruct and the editors can resume it later without inverting again. "
                        "Move the file to the input folder to load it with LoadInversion.",
            inputs=[
                io.Latent.Input("latent", tooltip="The output of Invert (a plain latent is refused: use SaveLatent)."),
                io.String.Input("filename_prefix", default="inversions/InversionSuite",
                                tooltip="File name start, relative to the output folder; a counter and "
                                        "'_.safetensors' are appended, as SaveLatent does."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, filename_prefix):
        check_record("SaveInversion", latent, "latent")
        tensors, content = encode("SaveInversion", latent)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        meta = {VERSION_KEY: str(FILE_FORMAT), CONTENT_KEY: content}
        hidden = cls.hidden  # None when called outside an executing graph
        if not args.disable_metadata and getattr(hidden, "prompt", None) is not None:
            # The graph that made it, as SaveLatent stores it, so a shared file can be traced.
            meta["prompt"] = json.dumps(hidden.prompt)
            for k, v in (hidden.extra_pnginfo or {}).items():
                meta.setdefault(k, json.dumps(v))
        file = f"{name}_{counter:05}_{EXTENSION}"
        os.makedirs(folder, exist_ok=True)
        safetensors.torch.save_file(tensors, os.path.join(folder, file), metadata=meta)
        return io.NodeOutput(ui={"latents": [ui.SavedResult(file, subfolder, io.FolderType.output)]})


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_LoadInversion",
            display_name="Load Inversion",
            category="sampling/inversion",
            description="Loads an inversion saved by SaveInversion from the input folder and checks it against "
                        "the model: the LATENT comes back bit for bit, ready for Reconstruct and the editors. "
                        "Refuses plain latents, damaged files, files from a newer version and inversions made "
                        "with a different kind of model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion will be used with; it must be the kind "
                                                "of model that made it (prediction type and latent format)."),
                # The host uploads only images, video and audio from a combo: the pack's web/js adds the
                # upload button. An empty folder offers "none" (an empty list shows "undefined").
                io.Combo.Input("inversion", options=input_files() or ["none"],
                               tooltip="A .safetensors file from Save Inversion, in the input folder; 'choose "
                                       "inversion to upload' copies one there. 'none': the folder has none yet."),
            ],
            outputs=[io.Latent.Output(display_name="inverted",
                                      tooltip="The saved inverted LATENT with its inversion record.")],
        )

    @classmethod
    def execute(cls, model, inversion):
        node = "LoadInversion"
        path = folder_paths.get_annotated_filepath(inversion)
        if not os.path.isfile(path):
            fail(node, "inversion", f"file {inversion!r} not found in the input folder")
        latent = read(node, "inversion", inversion, path)
        check_record(node, latent, "inversion", DAMAGED)
        check_latent(node, latent, model, "inversion")
        record_of(node, latent, model, "inversion")  # the model check Reconstruct will make
        return io.NodeOutput(latent)

    @classmethod
    def fingerprint_inputs(cls, inversion, model=None):
        # Re-run when the file's bytes change, as LoadLatent does.
        path = folder_paths.get_annotated_filepath(inversion)
        if not os.path.isfile(path):
            return ""
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def validate_inputs(cls, inversion):
        if not folder_paths.exists_annotated_filepath(inversion):
            return f"LoadInversion: input 'inversion': file {inversion!r} not found in the input folder"
        return True
