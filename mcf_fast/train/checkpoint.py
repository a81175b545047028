"""Atomic, resumable checkpoints through `torch.distributed.checkpoint` (DCP).

Layout: OUT/checkpoints/step_NNNNNNNN/ holds DCP shards (model without the frozen teacher, optimizer),
`extra_rank{R}.pt` (step, data position, counters, RNG) and `COMPLETE` (JSON: step, world size, finite).
Everything is written into `step_NNNNNNNN.tmp/` first; rank 0 writes COMPLETE after a barrier and
renames the folder, so a checkpoint either exists whole or not at all. Only folders with COMPLETE are
ever read; old ones rotate away, but never the newest one whose weights were finite.
DCP re-shards on load, so a run saved at one world size resumes at another.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")
FROZEN_PREFIXES = ("perceptual.",)  # rebuilt from the config (seed or checkpoint path), never saved


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _model_sd(model) -> dict:
    sd = get_model_state_dict(model)
    return {k: v for k, v in sd.items() if not k.startswith(FROZEN_PREFIXES)}


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.exists(os.path.join(path, "COMPLETE")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def read_marker(path: str) -> dict:
    with open(os.path.join(path, "COMPLETE")) as f:
        return json.load(f)


def save(ckpt_dir: str, step: int, model, optimizer, extra: dict, keep_last: int, finite: bool) -> str:
    """Write a checkpoint atomically (all ranks call this). Returns its final path."""
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    rank = _rank()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt killed mid-write
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    state = {"model": _model_sd(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # single-process DCP is intended here, not a misconfiguration
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            json.dump({"step": step, "world_size": world, "finite": bool(finite)}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(ckpt_dir, keep_last)
    _barrier()
    return final


def _rotate(ckpt_dir: str, keep_last: int) -> None:
    ckpts = complete_checkpoints(ckpt_dir)
    finite = [p for _, p in ckpts if read_marker(p).get("finite", True)]
    protect = {finite[-1]} if finite else set()
    for _, path in ckpts[:-keep_last]:
        if path not in protect:
            shutil.rmtree(path, ignore_errors=True)


def latest(ckpt_dir: str, finite_only: bool = False) -> str | None:
    ckpts = complete_checkpoints(ckpt_dir)
    if finite_only:
        ckpts = [(s, p) for s, p in ckpts if read_marker(p).get("finite", True)]
    return ckpts[-1][1] if ckpts else None


def load(path: str, model, optimizer) -> dict:
    """Load model + optimizer (re-sharded to this world size) and this rank's extra state."""
    state = {"model": _model_sd(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    opts = StateDictOptions(strict=False)
    missing, unexpected = set_model_state_dict(model, state["model"], options=opts)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:10]}, "
                           f"unexpected {list(unexpected)[:10]} (was it written with another config?)")
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rank = _rank()
    extra_path = os.path.join(path, f"extra_rank{rank}.pt")
    if not os.path.exists(extra_path):  # resumed at a larger world size: this rank is new
        extra_path = os.path.join(path, "extra_rank0.pt")
    return torch.load(extra_path, map_location="cpu", weights_only=True)
