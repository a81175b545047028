"""Data path: synthetic faces, readers (shards, folders, list files, LMDB), torch and DALI loaders,
face-crop preparation and scanning. See docs/ARCHITECTURE.md ("Data") for the contract and
docs/data.md for the user's view. Which reader a `--data.path` gets is the registry in `sources.py`.

Importing this package imports numpy only; torch, DALI and the decoders load on first use.
"""
from .config import DataConfig

__all__ = ["Batch", "DataConfig", "PretrainLoader", "build_pretrain_loader"]


def __getattr__(name):
    # lazy: `from mcf_fast.data import build_pretrain_loader` should not pay for torch at import time
    if name in ("build_pretrain_loader", "PretrainLoader", "Batch"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(name)
