"""The inversion file: an inverted LATENT, record and all, in one .safetensors file.

Tensors are stored by safetensors; everything else (the LATENT's structure, the record's
numbers and strings) is JSON in the file's metadata, with each tensor written as
``{"__tensor__": key}``. A tensor reached twice (the LATENT's samples and the record's
``samples``) is stored once and comes back as one object, so Reconstruct still sees
untouched samples. No pickle: the file cannot run code when loaded. Files are read from the
host's input folder only.
"""

import hashlib
import json
import os

import folder_paths
import safetensors
import torch

from .inputs import fail

FILE_FORMAT = 1
VERSION_KEY = "inversion_suite_format"
CONTENT_KEY = "inversion_suite_latent"
TENSOR, TUPLE = "__tensor__", "__tuple__"
EXTENSION = ".safetensors"
# The header (JSON: tensor table, the LATENT's structure, the workflow) is read whole before
# anything is checked, so its size is bounded first; a real one is a few hundred KiB at most.
MAX_HEADER = 8 * 2 ** 20

PLAIN = "connect the output of Invert (for a plain latent use the core SaveLatent / LoadLatent nodes)"
DAMAGED = "the file is damaged or was not written by SaveInversion"


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


def decode(content, tensor):
    """The LATENT from its JSON structure; ``tensor(key)`` gives each stored tensor (same key, same object)."""
    def walk(v):
        if isinstance(v, dict):
            if set(v) == {TENSOR}:
                return tensor(v[TENSOR])
            if set(v) == {TUPLE}:
                return tuple(walk(x) for x in v[TUPLE])
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    return walk(content)


def nowhere(name) -> str:
    # One wording for missing, outside the input folder and unreadable: a caller cannot probe which files exist.
    return f"no readable inversion file {name!r} in the input folder (a {EXTENSION} file from SaveInversion)"


def resolve(name):
    """The real path of input file ``name``, or None unless it is a readable file inside the input folder.

    Symlinks are followed before the check, so a link (or ``..``, or an absolute path) that
    leads out of the folder is refused; subfolders are allowed.
    """
    if not isinstance(name, str) or not name.endswith((EXTENSION, ".latent")):  # .latent: to name SaveLatent's files
        return None
    try:
        folder = os.path.realpath(folder_paths.get_input_directory())
        path = os.path.realpath(os.path.join(folder, name))
        inside = os.path.commonpath([folder, path]) == folder and path != folder
        return path if inside and os.path.isfile(path) and os.access(path, os.R_OK) else None
    except (OSError, ValueError):  # a NUL byte, a path on another drive
        return None


def header(f, size: int, bad: str, node: str, what: str) -> bytes:
    """The safetensors header of an open file, its length bounded before it is read."""
    n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if n < 2 or 8 + n > size:
        fail(node, what, f"{bad}: its safetensors header is incomplete (expected a file from SaveInversion)")
    if n > MAX_HEADER:
        fail(node, what, f"{bad}: its header is {n} bytes, more than the {MAX_HEADER} an inversion file has")
    return f.read(n)


def read(node: str, what: str, name: str, path: str) -> dict:
    """The LATENT stored in ``path``, with a clear refusal for anything that is not one."""
    bad = f"{name!r} is truncated or corrupt"
    try:
        with open(path, "rb") as f:
            raw = header(f, os.fstat(f.fileno()).st_size, bad, node, what)
    except OSError:
        fail(node, what, nowhere(name))
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError):
        head = None
    meta = (head.get("__metadata__") or {}) if isinstance(head, dict) else None
    if not isinstance(meta, dict):
        fail(node, what, f"{bad}: its safetensors header is not valid")
    if VERSION_KEY not in meta:
        if "latent_tensor" in head:
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
        with safetensors.safe_open(path, framework="pt") as f:
            known, loaded = set(f.keys()), {}

            def tensor(key):  # only the tensors the content names, each once
                if key not in loaded:
                    if key not in known:
                        raise KeyError(f"no tensor {key!r}")
                    loaded[key] = f.get_tensor(key)
                return loaded[key]
            latent = decode(json.loads(meta[CONTENT_KEY]), tensor)
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        fail(node, what, f"{bad}: {type(e).__name__}: {str(e)[:200]}")
    return latent


def fingerprint(name) -> str:
    """What changes when input file ``name`` does: its size, its time and its header (which names
    every tensor's offsets), read without the rest of the file; "" for no readable file."""
    path = resolve(name)
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(max(n, 0), MAX_HEADER))
    except OSError:
        return ""
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(head).hexdigest()}"


def input_files():
    folder = folder_paths.get_input_directory()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(EXTENSION) and os.path.isfile(os.path.join(folder, f)))


def check_extras(node: str, latent: dict):
    """The LATENT keys beside samples and the record that core nodes read."""
    b = latent["samples"].shape[0]
    index = latent.get("batch_index")
    if index is not None and not (isinstance(index, list) and len(index) == b
                                  and all(type(i) is int and i >= 0 for i in index)):
        fail(node, "inversion", f"{DAMAGED}: 'batch_index' must be a list of {b} integers >= 0")
    mask = latent.get("noise_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.is_floating_point()
                                 and 2 <= mask.ndim <= 5 and torch.isfinite(mask).all()):
        fail(node, "inversion", f"{DAMAGED}: 'noise_mask' must be a finite floating-point mask tensor")
