"""Checks that need more than one field, or the file system, run before any model is built.

`check_numbers(cfg)`: every float field (and float tuple) is finite, every int field is an int; the
section `validate()` methods then check ranges. `check_inputs(cfg)`: paths (teacher, decoder_init,
init, data) exist, and cross-field constraints hold, including the teacher layers against a
checkpoint teacher's depth, read from the file's header without loading its tensors. Every error is
a ValueError whose one-line message names the option and the fix; the CLI turns it into exit 2.
Nothing here imports torch (a .pth header is read with a stub unpickler), so errors come in well under
a second after the arguments are parsed.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import re
import zipfile

from mcf_fast.pickle_bounds import RefusedFile

SEED_MAX = 2**63 - 2  # the teacher's seed is seed + 1, and both must fit an int64
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
# How known layouts wrap a ViT's keys (model/checkpoints.py reads the same layouts when loading).
_ENCODER_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.encoder.", "encoder.", "module.", "model.", "")


def _bad(key: str, value, msg: str):
    raise ValueError(f"--{key} {value!r}: {msg}")


def check_numbers(cfg) -> None:
    """Finite floats and true ints in every section (nan and inf slip through `<` comparisons)."""
    for sec in ("model", "optim", "data", "run", "dist"):
        sub = getattr(cfg, sec)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            for x in vals:
                if isinstance(x, float) and not math.isfinite(x):
                    _bad(f"{sec}.{f.name}", v, "must be a finite number")
                if isinstance(x, int) and not isinstance(x, bool) and abs(x) > 2**63 - 1:
                    _bad(f"{sec}.{f.name}", v, "is out of the 64-bit integer range")
    if not 0 <= cfg.run.seed <= SEED_MAX:
        _bad("run.seed", cfg.run.seed, f"must be in [0, {SEED_MAX}] (e.g. 0)")


# ---------------------------------------------------------------------- checkpoint headers (no torch)
class _Stub:
    """Stands for any class or tensor in a pickled state dict: accepts every call and state."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Stub()

    def __setstate__(self, state):
        pass


class _Dict(dict):
    """An OrderedDict stand-in that takes the attributes torch pickles with a state dict (_metadata)."""


class _KeysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
            return _Dict
        return _Stub  # tensors, storages, Namespaces...: never constructed for real, no code runs

    def persistent_load(self, pid):
        return None


def _safetensors_keys(path: str) -> list[str]:
    """Tensor names from a safetensors header, read bounded (`safe_load.safetensors_header`)."""
    from mcf_fast.safe_load import safetensors_header
    return [k for k in safetensors_header(path) if k != "__metadata__"]


def checkpoint_keys(path: str) -> list[str] | None:
    """Tensor names of a .safetensors or zip-format torch checkpoint from its header / pickle only
    (nested {'state_dict'|'model': ...} flattened with dots); None when the format is not recognised.
    The pickle is walked first (`pickle_bounds`: a bomb is a RefusedFile, one line) and read from the
    record torch.load would read (PREFIX/data.pkl, PREFIX named by the first record)."""
    if path.endswith(".safetensors"):
        return _safetensors_keys(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04" or not zipfile.is_zipfile(path):  # torch's own test for its zip reader
            return None
    from mcf_fast.safe_load import check_torch_file
    check_torch_file(path)  # stored records only, PREFIX/data.pkl walked: a RefusedFile line otherwise
    with zipfile.ZipFile(path) as z:
        with z.open(z.namelist()[0].split("/", 1)[0] + "/data.pkl") as fh:
            data = fh.read()
    try:
        obj = _KeysOnly(io.BytesIO(data)).load()
    except Exception as e:  # stubs make any class "build"; what is left is a damaged stream
        raise RefusedFile(f"{path!r}: its pickle does not read ({type(e).__name__}); re-save it with torch.save") from None
    keys: list[str] = []

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict) and len(pre) < 64:
                walk(v, f"{pre}{k}.")
            elif isinstance(k, str):
                keys.append(pre + k)
    if isinstance(obj, dict):
        walk(obj, "")
    return keys


def teacher_depth(path: str) -> int | None:
    """Blocks of the ViT in a teacher checkpoint (the prefix the loader would pick), or None if unknown."""
    keys = checkpoint_keys(path)
    if not keys:
        return None
    for wrap in ("state_dict.", "model.", "module.", "model_state.", ""):
        for pre in _ENCODER_PREFIXES:
            full = wrap + pre
            if any(k.startswith(full + "patch_embed.") for k in keys):
                idx = [int(m.group(1)) for k in keys if k.startswith(full + "blocks.")
                       and (m := _BLOCK.match(k[len(full):]))]
                return 1 + max(idx) if idx else None
    return None


# ---------------------------------------------------------------------- paths and cross-field checks
def _check_file(key: str, path: str, what: str) -> None:
    if not os.path.exists(path):
        _bad(key, path, f"does not exist: give the path of {what}")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "encoder.safetensors")):
        _bad(key, path, f"is a folder: give the file of {what}")


def _check_data_path(path: str) -> None:
    if not path:
        return
    hint = ("give an image folder, a webdataset shard pattern like /data/faces-{000000..000099}.tar, a .txt list, "
            "or an LMDB database (a folder with data.mdb, or a .lmdb file); '' = synthetic faces")
    probe = path
    m = re.search(r"\{(\d+)\.\.(\d+)\}", path)
    if m:  # a brace pattern: its folder must exist, and its first shard
        probe = path[:m.start()] + m.group(1) + path[m.end():]
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            _bad("data.path", path, f"folder {folder!r} does not exist: {hint}")
    if not os.path.exists(probe):
        _bad("data.path", path, f"does not exist{' (its first shard ' + repr(probe) + ')' if m else ''}: {hint}")


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_inputs(cfg) -> None:
    """Paths and constraints across fields, before anything is built (ValueError, one line each)."""
    m, o, d, r = cfg.model, cfg.optim, cfg.data, cfg.run
    kind, _, arg = m.teacher.partition(":")
    if kind == "checkpoint":
        if "#" in arg and not os.path.exists(arg):  # FILE#PART picks a sub-network (model/layouts.py)
            arg = arg.rpartition("#")[0]
        _check_file("model.teacher", arg, "a pre-trained ViT checkpoint (.pth, .pth.tar or .safetensors)")
        path = os.path.join(arg, "encoder.safetensors") if os.path.isdir(arg) else arg
        depth = teacher_depth(path)
        if depth is not None and max(m.teacher_layers) >= depth:
            _bad("model.teacher_layers", ",".join(map(str, m.teacher_layers)),
                 f"block {max(m.teacher_layers)} is beyond the {depth}-block teacher in {arg!r}; "
                 f"use indices 0..{depth - 1}")
    if m.decoder_init:
        _check_file("model.decoder_init", m.decoder_init, "an MAE pre-training checkpoint")
    if getattr(m, "init", ""):
        _check_file("model.init", m.init, "a checkpoint to start from")
    _check_data_path(d.path)
    if d.loader == "dali" and not d.path:
        _bad("data.loader", d.loader, "DALI reads validated shards, not synthetic faces: use --data.loader torch "
             "(or auto), or give --data.path shards")
    world = _world_size()
    if o.batch_size * world < 2:
        _bad("optim.batch_size", o.batch_size, "the projector's BatchNorm needs at least 2 images per step "
             "(over all ranks): use --optim.batch_size 2 or more")
    if not d.path and o.batch_size * world > d.synthetic_size:
        _bad("optim.batch_size", o.batch_size, f"one step needs {o.batch_size * world} images but "
             f"--data.synthetic_size is {d.synthetic_size}: lower the batch or raise --data.synthetic_size")
    L = (m.img_size // m.patch_size) ** 2
    if kind == "pixel" and int(L * (1 - m.mask_ratio)) >= L:
        _bad("model.mask_ratio", m.mask_ratio, "removes no patch, and the pixel teacher's loss is taken on "
             "removed patches: use a ratio above 0 (0.75 in MAE)")
    cpus = os.cpu_count() or 1
    if r.threads > 4 * cpus:
        _bad("run.threads", r.threads, f"is more than 4x this machine's {cpus} CPUs: use 0 (torch's default) "
             f"or at most {cpus}")
