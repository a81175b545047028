"""FSDP2 wrapping of the MCF model and gathering of full weights for export.

Single-process runs never come here except through `full_encoder`, which then returns the encoder.
"""
from __future__ import annotations

import torch

from .runtime import Runtime


def shard_model(model, cfg, rt: Runtime):
    """FSDP2 `fully_shard` per block and per module; filled in by the scale work (issue 6)."""
    raise NotImplementedError("multi-rank training lands with FSDP2 support")


def full_encoder(model, rt: Runtime) -> torch.nn.Module:
    """The online encoder with full (unsharded) weights, on every rank."""
    return model.encoder
