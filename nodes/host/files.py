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
import math
import os
import sys

import folder_paths
import torch

from ...solvers.record import MAX_STEPS, REFINE
from .inputs import fail
from .model import check_layout
from .record import same_samples

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


def opened_at(f):
    """Where the system opened ``f``, as it resolved the name then; None where it cannot tell."""
    fd = f.fileno()
    try:
        if os.path.isdir("/proc/self/fd"):  # Linux
            where = os.readlink(f"/proc/self/fd/{fd}")
            return None if where.endswith(" (deleted)") else where
        if sys.platform == "darwin":
            import fcntl
            return fcntl.fcntl(fd, 50, b"\0" * 1024).split(b"\0", 1)[0].decode()  # F_GETPATH
        if os.name == "nt":
            import ctypes
            import msvcrt
            buf = ctypes.create_unicode_buffer(32768)
            n = ctypes.windll.kernel32.GetFinalPathNameByHandleW(msvcrt.get_osfhandle(fd), buf, 32768, 0)
            return buf.value[4:] if n and buf.value.startswith("\\\\?\\") else (buf.value or None)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def inside(folder: str, path: str) -> bool:
    folder, path = os.path.normcase(folder), os.path.normcase(path)
    return os.path.commonpath([folder, path]) == folder and path != folder


def open_input(name):
    """Input file ``name`` opened once for reading, or None unless what was opened lies in the input folder.

    The name is checked (``resolve``), opened, and then the open file itself is located: a folder
    on the way swapped for a link between the check and the open cannot lead the read outside.
    """
    path = resolve(name)
    if path is None:
        return None
    try:
        f = open(path, "rb")
    except OSError:
        return None
    where = opened_at(f)
    folder = os.path.realpath(folder_paths.get_input_directory())
    if where is not None:
        ok = inside(folder, os.path.realpath(where))
    else:  # no system call tells: the file checked again must be the very file opened
        again = resolve(name)
        ok = again is not None and os.path.samestat(os.fstat(f.fileno()), os.stat(again))
    if not ok:
        f.close()
        return None
    return f


# safetensors' dtype names of the tensors an inversion file holds (latents, schedules, masks)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The index a LATENT's batch_index may hold: EmptyLatentImage makes batches of up to 4096.
MAX_BATCH = 4096


def table_of(head: dict, size: int, bad: str, node: str, what: str) -> dict:
    """key -> (dtype, shape, start, end) from a safetensors header, each entry checked against the file
    (a dtype an inversion file does not hold is kept as its name, for ``plan`` to refuse by where it is used)."""
    out = {}
    for key, e in head.items():
        if key == "__metadata__":
            continue
        shape, offsets = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            fail(node, what, f"{bad}: its tensor table entry {key[:50]!r} is not valid")
        t = DTYPES.get(e.get("dtype"), str(e.get("dtype"))[:20])
        n = math.prod(shape) * (t.itemsize if isinstance(t, torch.dtype) else 1)
        if offsets[0] < 0 or offsets[1] > size or isinstance(t, torch.dtype) and offsets[1] - offsets[0] != n:
            fail(node, what, f"{bad}: tensor {key[:50]!r} does not fit its stated size or the file")
        out[key] = (t, tuple(shape), *offsets)
    return out


def plan(content, table: dict, bad: str, node: str, what: str, model=None) -> None:
    """Every tensor the LATENT names, its shape checked from the header before any is read: the
    record's latents match the samples', the schedule is within what the pack writes, and no
    tensor is larger than 64 times the samples (an image-sized mask of them)."""
    def ref(v):
        return v[TENSOR] if isinstance(v, dict) and set(v) == {TENSOR} else None

    def malformed(field, expected, got):
        fail(node, what, f"its inversion record is malformed: '{field}' must be {expected}, got {got}")

    for where, key in refs(content):
        if not isinstance(key, str) or key not in table:
            fail(node, what, f"{bad}: its {where or 'content'} names a tensor {str(key)[:50]!r} it does not store")
    if not isinstance(content, dict) or ref(content.get("samples")) is None:
        fail(node, what, "expected a LATENT (a dict with a 'samples' tensor)")
    dtype, samples = table[ref(content["samples"])][:2]
    if model is not None:
        check_layout(node, what, samples, dtype, model)
    elif len(samples) not in (4, 5):
        fail(node, what, f"expected 4D (B,C,H,W) or 5D (B,C,T,H,W) samples, got shape {samples}")
    rec = content.get("inversion") if isinstance(content.get("inversion"), dict) else {}
    steps = rec.get("steps") if type(rec.get("steps")) is int and 1 <= rec["steps"] <= MAX_STEPS else MAX_STEPS
    most = 1 + steps * REFINE
    if ref(rec.get("samples")) is not None:
        same_samples(node, what, samples, table[ref(rec["samples"])][1])
    traj = rec.get("trajectory")
    traj = list(enumerate(traj)) if isinstance(traj, list) else []
    if len(traj) > most:
        malformed("trajectory", f"None or a list of at most {most} tensors (one per sigma)", f"{len(traj)} item(s)")
    for name, v in [("source", rec.get("source")), ("pair", rec.get("pair"))] + [(f"trajectory[{i}]", v) for i, v in traj]:
        if ref(v) is not None and table[ref(v)][1] != samples:
            malformed(name, f"a floating-point tensor of the samples' shape {samples}", table[ref(v)][1])
    if ref(rec.get("sigmas")) is not None:
        s = table[ref(rec["sigmas"])][1]
        if len(s) != 1:
            malformed("sigmas", "a 1-D floating-point tensor", f"shape {s}")
        if s[0] > most:
            malformed("sigmas", f"from steps + 1 = {steps + 1} to 1 + steps * {REFINE} = {most} long", f"{s[0]} values")
    for where, key in refs(content):
        if not isinstance(table[key][0], torch.dtype):
            field = where.split(".", 1)[1] if where.startswith("inversion.") else where
            fail(node, what, f"its inversion record is malformed: '{field}' must be a floating-point tensor "
                             f"({', '.join(DTYPES)}), the file stores {table[key][0]}")
    size = math.prod(samples)
    big = [k for k, (_, sh, *_) in table.items() if math.prod(sh) > 64 * size]
    if big:  # no tensor of an inversion is larger than an image-sized mask of its samples
        fail(node, what, f"{bad}: tensor {big[0][:50]!r} is larger than anything an inversion of its samples holds")


def refs(content, where=""):
    """(where, key) of every stored tensor a LATENT's content names: 'samples', 'inversion.trajectory[3]'..."""
    if isinstance(content, dict) and set(content) == {TENSOR}:
        yield where, content[TENSOR]
    elif isinstance(content, dict) and set(content) == {TUPLE}:
        yield from refs(content[TUPLE], where)
    elif isinstance(content, dict):
        for k, v in content.items():
            yield from refs(v, f"{where}.{k}" if where else k)
    elif isinstance(content, list):
        for i, v in enumerate(content):
            yield from refs(v, f"{where}[{i}]")


def read(node: str, what: str, name: str, model=None) -> dict:
    """The LATENT stored in input file ``name``, with a clear refusal for anything that is not one.

    The file is opened once (``open_input``); its header is checked whole, every tensor's shape
    and size included (against ``model``'s latents, given one), before any tensor is read; then
    only the tensors the LATENT names are read.
    """
    bad = f"{name!r} is truncated or corrupt"
    f = open_input(name)
    if f is None:
        fail(node, what, nowhere(name))
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            raw = header(f, size, bad, node, what)
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
                fail(node, what, f"{name!r} is a plain latent from the core SaveLatent node, not an inversion: load "
                                 "it with LoadLatent and run Invert, or save Invert's output with SaveInversion")
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
            content = json.loads(meta[CONTENT_KEY])
        except (KeyError, TypeError, ValueError, RecursionError):
            fail(node, what, f"{bad}: its content is missing or not valid JSON")
        table = table_of(head, size, bad, node, what)
        plan(content, table, bad, node, what, model)
        start, loaded = 8 + len(raw), {}

        def tensor(key):  # only the tensors the content names, each once
            if key not in loaded:
                if key not in table:
                    fail(node, what, f"{bad}: it names a tensor {key[:50]!r} it does not store")
                dtype, shape, a, b = table[key]
                buf = bytearray(b - a)
                f.seek(start + a)
                if f.readinto(buf) != b - a:
                    fail(node, what, f"{bad}: tensor {key[:50]!r} ends before its stated size")
                loaded[key] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
            return loaded[key]
        try:
            return decode(content, tensor)
        except OSError:
            fail(node, what, nowhere(name))


def fingerprint(name) -> str:
    """What changes when input file ``name`` does: its size, its time and its header (which names
    every tensor's offsets), read without the rest of the file; "" for no readable file."""
    f = open_input(name)
    if f is None:
        return ""
    try:
        with f:
            st = os.fstat(f.fileno())
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(max(n, 0), MAX_HEADER))
    except OSError:
        return ""
    return f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(head).hexdigest()}"


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
                                  and all(type(i) is int and 0 <= i < MAX_BATCH for i in index)):
        fail(node, "inversion", f"{DAMAGED}: 'batch_index' must be a list of {b} integers from 0 to {MAX_BATCH - 1}")
    mask = latent.get("noise_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.is_floating_point()
                                 and 2 <= mask.ndim <= 5 and torch.isfinite(mask).all()):
        fail(node, "inversion", f"{DAMAGED}: 'noise_mask' must be a finite floating-point mask tensor")
