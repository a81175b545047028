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
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_META: frozenset({"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                          "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    # Building a path object from strings runs no user code; Windows names only fail to build on Linux.
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
}


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
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._path} asks to build {module}.{name}, which DCP metadata never contains: refused without "
            "running it. Do not resume from or convert this checkpoint unless you know who wrote it.")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._path} holds a persistent reference ({pid!r}); DCP metadata has none: "
                                    "refused")


def _check_structure(md: Any, path: str) -> Metadata:
    """The unpickled object must be DCP metadata whose storage entries name plain files in the same folder."""
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
    return md


def read_metadata_file(path: str) -> Metadata:
    """Unpickle one `.metadata` file with the restricted unpickler and check its structure."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise pickle.UnpicklingError(f"{path} is empty")
    md = _RestrictedUnpickler(io.BytesIO(data), path).load()
    return _check_structure(md, path)


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata comes from the restricted unpickler (tensors it already reads
    with `torch.load(weights_only=True)`)."""

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
