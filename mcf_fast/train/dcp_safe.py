"""Reading `torch.distributed.checkpoint` (DCP) folders without executing anything they contain.

DCP's own `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`, and its
`DefaultLoadPlanner.load_bytes` reads non-tensor entries (optimizer hyper-parameters) with
`torch.load(weights_only=False)`: a run folder handed to us could run code on resume or convert.
Here `.metadata` goes through an unpickler that resolves only the classes a real DCP checkpoint of
this project pickles, and byte entries load with `weights_only=True`.

The allowed globals were listed by saving a checkpoint of the MCF model with fused AdamW state
(torch 2.14, 2026-12-01) and recording every `find_class` call of its `.metadata`:
DCP's metadata dataclasses, `_StorageInfo`, `torch.Size`, torch dtypes, `torch.serialization._get_layout`
(how `torch.strided` pickles) and `pathlib.PosixPath` (`StorageMeta.checkpoint_id`).

Bounded as well as safe: `.metadata` and every entry of the data files pass the opcode walk
(`mcf_fast.pickle_bounds`) before they are unpickled, and the metadata's values are checked
(`dcp_values`) before anyone allocates by them, so a 2 KB folder cannot claim a 4 TB tensor.
"""
from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from mcf_fast.pickle_bounds import RefusedFile
from mcf_fast.pickle_walk import check_untrusted
from mcf_fast.safe_load import check_torch_file

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_META: frozenset({"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                          "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
}
# Paths build as pure paths: no file system access, and a checkpoint written on Windows (WindowsPath,
# which cannot be instantiated on Linux) reads on Linux. Python 3.13 pickles them from pathlib._local.
_PATHS = {"PosixPath": pathlib.PurePosixPath, "PurePosixPath": pathlib.PurePosixPath,
          "WindowsPath": pathlib.PureWindowsPath, "PureWindowsPath": pathlib.PureWindowsPath}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which one, why, and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to build something outside what DCP itself writes: it was refused, unread."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return _PATHS[name]
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._path} asks to build {module}.{name}, which DCP metadata never contains: refused without "
            "running it. Do not resume from or convert this checkpoint unless you know who wrote it.")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._path} holds a persistent reference ({pid!r}); DCP metadata has none: "
                                    "refused")


def _check_structure(md: Any, path: str) -> Metadata:
    """The unpickled object must be DCP metadata whose storage entries name plain files in the same folder
    and whose values are in range (`dcp_values`)."""
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path} does not hold DCP metadata (got {type(md).__name__}): refused")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise UnsafeCheckpointError(f"{path}: storage_data is {type(storage).__name__}, not a dict: refused")
    for key, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(key, MetadataIndex) or not isinstance(rel, str):
            raise UnsafeCheckpointError(f"{path}: a storage entry is not (MetadataIndex, _StorageInfo): refused")
        # A relative path with a separator or '..' would make the reader open files outside the checkpoint.
        if rel in ("", ".", "..") or os.path.basename(rel) != rel or "\\" in rel:
            raise UnsafeCheckpointError(f"{path}: storage entry {key.fqn!r} points outside the checkpoint "
                                        f"folder ({rel!r}): refused")
    from .dcp_values import check_values
    why = check_values(md)
    if why:
        raise UnsafeCheckpointError(f"{path}: {why}: refused (this is not metadata DCP writes; do not resume "
                                    "from or convert this checkpoint)")
    return md


def read_metadata_file(path: str) -> Metadata:
    """Walk, unpickle (restricted) and check one `.metadata` file. A stream that is not a pickle at all
    raises pickle.UnpicklingError (damage); one out of bounds, asking for code or holding values DCP
    never writes raises UnsafeCheckpointError."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise pickle.UnpicklingError(f"{path} is empty")
    check_untrusted(data, path, UnsafeCheckpointError)
    try:
        md = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except (UnsafeCheckpointError, pickle.UnpicklingError, EOFError):
        raise
    except Exception as e:  # a class built from values it refuses (torch.Size('abc')): not DCP's output
        raise UnsafeCheckpointError(f"{path}: builds invalid values ({type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:120]}): refused") from None
    return _check_structure(md, path)


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata comes from the restricted unpickler, and whose entries (tensors
    and bytes, each a small torch zip) are walked before DCP's `torch.load(weights_only=True)` reads them."""

    def _slice_file(self, file, sinfo) -> io.BytesIO:
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        where = f"{os.path.join(str(self.path), sinfo.relative_path)} at byte {sinfo.offset}"
        if len(data) != sinfo.length:
            raise CheckpointError(f"{where}: {len(data)} of {sinfo.length} bytes (the file is cut short)")
        try:
            check_torch_file(data, where)
        except RefusedFile as e:
            raise UnsafeCheckpointError(str(e)) from None
        return io.BytesIO(data)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta
        path = str(self._get_metadata_path(kwargs.get("rank")))
        md = read_metadata_file(path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` whose non-tensor entries (optimizer hyper-parameters) load with
    `weights_only=True`: numbers, strings, tuples, lists and dicts are all they ever are here."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data "
                                        f"({str(e).splitlines()[0]}): refused without running it") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict, path: str, no_dist: bool = False) -> None:
    """`dcp.load(state, checkpoint_id=path)` through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=no_dist)


__all__ = ["CheckpointError", "UnsafeCheckpointError", "SafeFileSystemReader", "SafeLoadPlanner", "read_metadata_file",
           "safe_load"]
