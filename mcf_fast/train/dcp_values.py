"""The values of DCP metadata, checked before anything is allocated or read by them.

`convert` builds `torch.empty(size, dtype)` for every tensor the metadata lists and DCP reads each
storage entry at the offset and length it gives, so a `.metadata` that says "2^40 elements", "-1",
`qint8` or `Size('abc')` must be refused with a line, not met as a 4 TB allocation or a traceback.
A tensor's bytes are bounded by the storage entries of its chunks (whose lengths the integrity checks
bound by the files on disk: `ckpt_integrity.storage_shortfall`), so no size can outgrow the folder.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

# What this project's checkpoints hold: float weights and optimizer state, int step counters, bool flags.
DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool})
MAX_DIMS = 32  # tensors here have at most 4 dimensions; DCP's own chunk logic assumes small ranks


def _ints(v, n: int | None = None) -> bool:
    """A tuple (torch.Size) of non-negative Python ints, of length n when given."""
    return (isinstance(v, tuple) and len(v) <= MAX_DIMS and (n is None or len(v) == n)
            and all(type(x) is int and x >= 0 for x in v))


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _check_chunks(fqn: str, m: TensorStorageMetadata, storage: dict) -> str | None:
    if not isinstance(m.chunks, list):
        return f"tensor {fqn!r} has no list of chunks"
    itemsize = m.properties.dtype.itemsize
    covered = 0
    for c in m.chunks:
        if not (isinstance(c, ChunkStorageMetadata) and _ints(c.offsets, len(m.size))
                and _ints(c.sizes, len(m.size))):
            return f"tensor {fqn!r} has a chunk that is not (offsets, sizes) of {len(m.size)} non-negative ints"
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, m.size)):
            return f"tensor {fqn!r} has a chunk outside its size {tuple(m.size)}"
        info = storage.get(MetadataIndex(fqn, c.offsets))
        if info is None:
            return f"tensor {fqn!r} has a chunk at {tuple(c.offsets)} with no storage entry"
        if _numel(c.sizes) * itemsize > info.length:
            return f"tensor {fqn!r} has a chunk of {_numel(c.sizes) * itemsize} bytes stored in {info.length}"
        covered += _numel(c.sizes)
    if _numel(m.size) > covered:
        return f"tensor {fqn!r} of size {tuple(m.size)} is larger than its chunks ({covered} elements)"
    return None


def _check_tensor(fqn: str, m: TensorStorageMetadata, storage: dict) -> str | None:
    props = m.properties
    if not isinstance(props, TensorProperties) or props.dtype not in DTYPES:
        return f"tensor {fqn!r} has dtype {getattr(props, 'dtype', None)}, not one of a checkpoint's dtypes"
    if not _ints(m.size):
        return f"tensor {fqn!r} has size {m.size!r}, not up to {MAX_DIMS} non-negative integers"
    return _check_chunks(fqn, m, storage)


def _check_storage(storage: dict) -> str | None:
    for key, info in storage.items():
        off, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            return f"storage entry {key.fqn!r} has offset {off!r} and length {length!r}, not byte counts"
        if getattr(info, "transform_descriptors", None):  # e.g. a decompressor: this project never writes one
            return f"storage entry {key.fqn!r} asks for stream transforms {info.transform_descriptors!r}"
    return None


def check_values(md) -> str | None:
    """Why the values of DCP metadata `md` (structure already checked) are out of range, or None."""
    why = _check_storage(md.storage_data)
    if why:
        return why
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            return f"a state-dict key {fqn!r} that is not a string"
        if isinstance(m, TensorStorageMetadata):
            why = _check_tensor(fqn, m, md.storage_data)
        elif not isinstance(m, BytesStorageMetadata):
            why = f"entry {fqn!r} is a {type(m).__name__}, neither tensor nor bytes metadata"
        if why:
            return why
    return None


__all__ = ["check_values", "DTYPES"]
