"""Weights-only, bounded loading of torch checkpoints that carry plain containers beside their tensors.

MAE's and the MCF reference code's `save_model` store `{'model', 'optimizer', 'epoch', 'scaler', 'args'}`
with `args` an `argparse.Namespace` (sometimes holding numpy scalars). `torch.load(weights_only=True)`
refuses those classes, so a user would be tempted to pass `weights_only=False` and run arbitrary code.
Here exactly these inert classes are allowed, for the duration of one load, and nothing else: a file
that needs any other global (a function, a model class) is refused with the globals it asked for.
`arrays=True` also allows numpy arrays (`ndarray` rebuilt by `_reconstruct`, whose subtype can only be
an allowed class): LAION-Face's released face detections are dicts of them (`mcf_fast.data.boxes`).

Before torch reads anything, the file's layout and its pickles are walked (`pickle_bounds`): a zip
checkpoint must hold only stored (uncompressed) records, so no record can inflate beyond the file;
the legacy format (five pickles, then raw storages) may not claim more storage bytes than follow its
pickles; the pickles themselves are bounded in expansion, depth and numpy item sizes. After loading,
every tensor must be a plain CPU tensor no larger than its storage (an expanded view of one number
would allocate its full size in the first `.contiguous()` or `isfinite`).
Top level, not under model/ or data/, because both read user files through it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import mmap
import os
import zipfile

import torch

from .pickle_bounds import PickleBoundsError, RefusedFile
from .pickle_walk import check_pickle

_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load tests to pick its zip reader (torch.serialization._is_zipfile)
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # the first pickle of torch's pre-1.6 format (serialization.MAGIC_NUMBER)
# Bytes per element of the storage classes a legacy-format pickle names; others count 16 (the largest).
_STORAGE_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


def _numpy_globals(arrays: bool) -> list:
    """numpy scalars and dtypes (and arrays), under the names both numpy 1.x and 2.x pickles use."""
    try:
        import numpy as np
    except ImportError:  # no numpy: no numpy pickles can be read either way
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out: list = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                 (scalar, "numpy._core.multiarray.scalar")]
    if arrays:
        rebuild = core.multiarray._reconstruct
        out += [np.ndarray, (rebuild, "numpy.core.multiarray._reconstruct"),
                (rebuild, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc.
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def allowed_globals(arrays: bool = False) -> list:
    """The allow-list: argparse.Namespace plus numpy scalar / dtype reconstruction; nothing callable beyond."""
    return [argparse.Namespace, *_numpy_globals(arrays)]


def _context(arrays: bool):
    allowed = allowed_globals(arrays)
    sg = getattr(torch.serialization, "safe_globals", None)
    if sg is None:  # torch < 2.5 has only the process-wide list; tuples (aliases) are 2.6+
        torch.serialization.add_safe_globals([g for g in allowed if not isinstance(g, tuple)])
        return contextlib.nullcontext()
    try:
        return sg(allowed)
    except TypeError:  # torch 2.5: no (obj, name) aliases
        return sg([g for g in allowed if not isinstance(g, tuple)])


def _refused_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch or an unreadable file: the caller's message still stands
        return []


# ---------------------------------------------------------------------- the layout walk
def _check_zip(data, name: str) -> None:
    """Stored records only (no inflation), unique names, and a data.pkl where torch looks for it."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)  # bytes or an open file
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RefusedFile(f"{name}: not a readable torch zip checkpoint ({e}); re-save it with torch.save") from None
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if not infos or len(set(names)) != len(names):
            raise RefusedFile(f"{name}: a zip checkpoint with no records or repeated record names: refused")
        packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise RefusedFile(f"{name}: record {packed[0]} is compressed; torch.save never compresses, and a "
                              "compressed record can inflate far beyond the file: refused (re-save with torch.save)")
        pkl = names[0].split("/", 1)[0] + "/data.pkl"  # torch reads PREFIX/data.pkl, PREFIX from the first record
        if pkl not in names:
            raise RefusedFile(f"{name}: no {pkl} record, so not a torch checkpoint: refused")
        with z.open(pkl) as f:
            check_pickle(f.read(), f"{name} ({pkl})", persistent=True)


def _check_legacy(data, name: str) -> None:
    """torch's pre-1.6 format: magic, protocol, sys info, the object, the storage keys, then raw storages."""
    end, storages = 0, {}
    for i in range(5):
        w = check_pickle(data, name, persistent=(i == 3), start=end,
                         max_nodes=None if i == 3 else 1 << 16)
        end = w.end
        if i == 0 and w.root.value != _LEGACY_MAGIC:
            return  # not a torch file: torch.load reads this one pickle (walked) and stops on its magic number
        for pid in w.pids:  # ('storage', StorageType, root key, location, numel, view)
            items = pid.items if pid.kind == "tuple" else []
            if len(items) >= 5 and items[1].kind == "global" and isinstance(items[4].value, int):
                kind = items[1].value.rpartition(".")[2].removesuffix("Storage")
                storages[items[2].value] = items[4].value * _STORAGE_BYTES.get(kind, 16)
    if sum(storages.values()) > len(data) - end:
        raise RefusedFile(f"{name}: its pickles claim {sum(storages.values())} bytes of storage but only "
                          f"{len(data) - end} follow them: refused (a damaged or hostile file)")


def check_torch_file(src, name: str | None = None) -> None:
    """Walk a torch checkpoint (a path or its bytes) without loading it; raise RefusedFile when it is out
    of bounds or not a torch file. Mirrors torch.load's choice of reader: zip if it starts with PK."""
    name = name or str(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        return (_check_zip if data[:4] == _ZIP_MAGIC else _check_legacy)(data, name)
    try:
        f = open(src, "rb")
    except OSError as e:
        raise RefusedFile(f"{name}: cannot be read ({e.strerror})") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise RefusedFile(f"{name} is empty (0 bytes): not a checkpoint")
        if f.read(4) == _ZIP_MAGIC:
            f.seek(0)
            return _check_zip(f, name)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # read in place, not copied
            return _check_legacy(data, name)


def check_tensors_bounded(obj, name: str) -> None:
    """Every tensor in a loaded object is a strided CPU tensor no larger than its storage."""
    seen, todo = set(), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.layout != torch.strided or o.device.type != "cpu" or o.is_quantized:
                raise RefusedFile(f"{name}: a tensor of layout {o.layout} on {o.device} (quantized: "
                                  f"{o.is_quantized}); only plain dense tensors are read")
            if o.numel() * o.element_size() > o.untyped_storage().nbytes():
                raise RefusedFile(f"{name}: a tensor of shape {tuple(o.shape)} is a view larger than the "
                                  f"{o.untyped_storage().nbytes()} bytes it stores (an expanded view): refused")
        elif isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo.extend(o)
        elif isinstance(o, argparse.Namespace):
            todo.extend(vars(o).values())


def safe_torch_load(path, arrays: bool = False, name: str | None = None):
    """`torch.load(path, weights_only=True)` with the allow-list above, after the bounded walk; a
    RefusedFile (a ValueError) with a one-line message otherwise. `path` may also be the file's bytes."""
    name = name or str(path)
    check_torch_file(path, name)
    try:
        with _context(arrays):
            src = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say which globals, not a pickle trace
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                   for g in allowed_globals(arrays)}
        extra = [g for g in _refused_globals(path) if g not in allowed] if isinstance(path, str) else []
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        what = f" (it needs {extra[:6]}, which are not plain data)" if extra else f": {first}"
        raise RefusedFile(f"could not read {name!r} as a weights-only torch checkpoint{what}. Files that need "
                          "arbitrary code to unpickle are refused; re-save it as a plain state dict "
                          "(torch.save(ckpt['model'], 'weights.pth')) from code you trust.") from None
    check_tensors_bounded(obj, name)
    return obj


# ---------------------------------------------------------------------- safetensors
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own cap on the JSON header


def safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file, read bounded (its 8-byte length must fit the file and the
    library's cap); RefusedFile (one line) for anything else, such as a pickle given that name."""
    import json
    import struct
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 1 < n <= min(size - 8, SAFETENSORS_MAX_HEADER):
                raise RefusedFile(f"{path!r} is not a safetensors file (header length {n} in a {size}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise RefusedFile(f"{path!r} cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        if isinstance(e, RefusedFile):
            raise
        raise RefusedFile(f"{path!r} is not a safetensors file (its header is not JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise RefusedFile(f"{path!r} is not a safetensors file (its header is not a JSON object)")
    return header


def safetensors_metadata(path: str) -> dict:
    """The `__metadata__` strings of a .safetensors file (checked header; {} when it has none)."""
    meta = safetensors_header(path).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def load_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file; the library's own errors become one RefusedFile line."""
    meta = safetensors_metadata(path)
    from safetensors.torch import load_file
    try:
        return load_file(path), meta
    except Exception as e:  # SafetensorError (not an OSError/ValueError): offsets, dtypes, a short file
        raise RefusedFile(f"{path!r} is not a readable safetensors file ({(str(e).splitlines() or [''])[0][:200]})"
                          ) from None


__all__ = ["safe_torch_load", "safetensors_header", "safetensors_metadata", "load_safetensors", "allowed_globals",
           "check_torch_file", "check_tensors_bounded", "RefusedFile", "PickleBoundsError"]
