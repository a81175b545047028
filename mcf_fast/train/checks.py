"""Checks that need more than one field, or the file system, run before any model is built.

`check_numbers(cfg)`: every float field (and float tuple) is finite, every int field is an int; the
section `validate()` methods then check ranges. `check_inputs(cfg)`: every registry entry the config
picks (its teacher kind, attention backend, ...: the fields whose metadata names a registry) runs its
own `precheck(cfg)`; input files exist and are regular files; a `--model.decoder_init` file holds the
decoder blocks asked for; the device and precision can run here; constraints across fields hold. File
contents are read from headers only (`model/headers.py`), never loaded. Every error is a ValueError
whose one-line message names the option and the fix; the CLI turns it into exit 2.

`BadInput` marks the same kind of error found later but still before the run folder is touched
(building the model reads the teacher's and decoder_init's tensors): `python -m mcf_fast.pretrain`
prints its one line and exits 2, with nothing written.
"""
from __future__ import annotations

import dataclasses
import math
import os

from mcf_fast.data.sources import check_data
from mcf_fast.model.checkpoints import decoder_blocks, unwrap_keys
from mcf_fast.model.headers import check_input_file, checkpoint_keys
from mcf_fast.model.layout_kinds import file_part_depth

SEED_MAX = 2**63 - 2  # the teacher's seed is seed + 1, and both must fit an int64


class BadInput(ValueError):
    """A bad value or input file, found before the run folder is touched: one line, exit 2."""


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


def teacher_depth(path: str, part: str | None = None) -> int | None:
    """Blocks of the ViT a teacher checkpoint gives (the part the loader would pick), from its header."""
    return file_part_depth(path, (part,) if part else ("teacher", "online_encoder"))


# ---------------------------------------------------------------------- paths and cross-field checks


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def picked(cfg) -> list:
    """The registry entries the config picks: for each field whose metadata names a registry, the entry
    its value names (a teacher spec 'checkpoint:PATH' names 'checkpoint')."""
    out = []
    for sec in ("model", "optim", "data", "run", "dist"):
        sub = getattr(cfg, sec)
        for f in dataclasses.fields(sub):
            reg = f.metadata.get("choices")
            if reg is not None:
                out.append(reg.get(str(getattr(sub, f.name)).partition(":")[0]))
    return out


def _check_decoder_init(m) -> None:
    """The file exists and, from its header, holds an MAE decoder with the blocks asked for."""
    check_input_file("model.decoder_init", m.decoder_init, "an MAE pre-training checkpoint")
    keys = checkpoint_keys(m.decoder_init) if os.path.isfile(m.decoder_init) else None
    if keys is None:  # not a zip/safetensors file: checked when it is loaded (still before anything is written)
        return
    keys = unwrap_keys(keys)
    if "decoder_embed.weight" not in keys:
        _bad("model.decoder_init", m.decoder_init, "holds no MAE decoder (no 'decoder_embed.weight'): give an MAE "
             "pre-training checkpoint such as mae_pretrain_vit_base_full.pth")
    have, n = decoder_blocks(keys), m.decoder_depth if m.decoder_init_blocks < 0 else m.decoder_init_blocks
    if n > have:
        _bad("model.decoder_init_blocks", m.decoder_init_blocks, f"asks for {n} decoder blocks but "
             f"{m.decoder_init!r} holds {have}: use at most {have}")


def _check_device(r) -> None:
    """The device exists here and the precision runs on it (fp16 needs a GPU): cheap torch queries only."""
    import torch
    dev = r.device
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            _bad("run.device", dev, "no CUDA device is visible here: use --run.device cpu (or auto)")
        suffix = dev.partition(":")[2]
        if suffix and not suffix.isdigit():
            _bad("run.device", dev, "must be cuda or cuda:N with N a device number")
        if int(suffix or 0) >= torch.cuda.device_count():
            _bad("run.device", dev, f"this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0..")
    if r.precision == "fp16" and not (dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())):
        _bad("run.precision", r.precision, "is for GPUs (CPU autocast fp16 is slow and unscaled): use bf16, fp32 "
             "or auto")


def check_inputs(cfg) -> None:
    """Paths and constraints across fields, before anything is built (ValueError, one line each)."""
    m, o, d, r = cfg.model, cfg.optim, cfg.data, cfg.run
    for entry in picked(cfg):  # each kind checks what it reads (model/teacher.py, model/attention.py, ...)
        precheck = getattr(entry, "precheck", None)
        if precheck is not None:
            precheck(cfg)
    if m.decoder_init:
        _check_decoder_init(m)
    if getattr(m, "init", ""):
        check_input_file("model.init", m.init, "a checkpoint to start from")
    _check_device(r)
    world = _world_size()
    if o.batch_size * world < 2:
        _bad("optim.batch_size", o.batch_size, "the projector's BatchNorm needs at least 2 images per step "
             "(over all ranks): use --optim.batch_size 2 or more")
    check_data(d, need=o.batch_size * world)  # the data source's own checks (mcf_fast/data/sources.py)
    cpus = os.cpu_count() or 1
    if r.threads > 4 * cpus:
        _bad("run.threads", r.threads, f"is more than 4x this machine's {cpus} CPUs: use 0 (torch's default) "
             f"or at most {cpus}")


__all__ = ["BadInput", "check_numbers", "check_inputs", "checkpoint_keys", "teacher_depth", "picked"]
