"""Atomic, verified, durable checkpoints through `torch.distributed.checkpoint` (DCP).

Layout: OUT/checkpoints/step_NNNNNNNN/ holds DCP shards (model without the frozen teacher, optimizer),
`extra_rank{R}.pt` (step, data position, counters, RNG) and `COMPLETE` (JSON: step, world size, finite,
keep_last, and the size and SHA-256 of every other file in the folder).
Everything is written into `step_NNNNNNNN.tmp/` first; each rank hashes and fsyncs the files it wrote,
rank 0 gathers the digests, writes and fsyncs COMPLETE and the folder, renames it and fsyncs the parent,
so a checkpoint either exists whole or not at all, also across a power loss. Resume picks the newest
checkpoint whose files still match their digests and whose weights are finite, and says why it skipped
any newer one; it never silently starts over when checkpoints exist. Old ones rotate away (also the
leftovers of a run killed between rename and rotation), but never the newest finite one.
Files are read with a restricted unpickler (`dcp_safe`): a checkpoint cannot run code.
DCP re-shards on load, so a run saved at one world size resumes at another.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mcf_fast.model.checkpoints import misfit_text

from . import ckpt_integrity as integ
from .dcp_safe import CheckpointError, UnsafeCheckpointError, read_metadata_file, safe_load

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(tmp|del)$")  # a save killed mid-write; a removal killed mid-way
FROZEN_PREFIXES = ("perceptual.",)  # rebuilt from the config (seed or checkpoint path), never saved
MARKER = integ.MARKER
_WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)  # CheckpointException is a BaseException
_VERIFIED: dict[str, tuple] = {}  # path -> (files' stat key, damage or None): resume asks more than once


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj) -> list:
    """`obj` from every rank (also a barrier); [obj] without a process group."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _model_sd(model) -> dict:
    sd = get_model_state_dict(model)
    return {k: v for k, v in sd.items() if not k.startswith(FROZEN_PREFIXES)}


def _step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every renamed-into-place step folder, whole or damaged, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = [(int(m.group(1)), os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if (m := _STEP_DIR.match(n))]
    return sorted(out)


def read_marker(path: str) -> dict:
    """The COMPLETE marker of a checkpoint folder; a missing, empty or garbled one is a CheckpointError."""
    p = os.path.join(path, MARKER)
    try:
        marker = integ.read_json(p)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MARKER} marker (deleted, or a half-written checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is empty or garbled ({type(e).__name__}): treat {path} as incomplete") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{p} is not a checkpoint marker (no integer 'step'): treat {path} as incomplete")
    return marker


def _marker_or_none(path: str) -> dict | None:
    try:
        return read_marker(path)
    except CheckpointError:
        return None


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint with a readable COMPLETE marker, oldest first (files not verified)."""
    return [(s, p) for s, p in _step_dirs(ckpt_dir) if _marker_or_none(p) is not None]


def damage(path: str) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (None: intact). Reads every byte once
    (~0.9 s/GB); the answer is cached while no file in the folder changes. A file asking to run code
    raises UnsafeCheckpointError instead: that is not damage to fall back from."""
    try:
        key = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)))
    except OSError as e:
        return f"cannot list the folder ({e})"
    cached = _VERIFIED.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    why = _check(path)
    _VERIFIED[path] = (key, why)
    return why


def _check(path: str) -> str | None:
    try:
        marker = read_marker(path)
    except CheckpointError as e:
        return str(e)
    files = marker.get("files")
    if not isinstance(files, dict):  # written before digests existed: structural checks only
        return integ.check_legacy(path)
    for required in (".metadata", "extra_rank0.pt"):
        if required not in files:
            return f"{MARKER} records no {required}"
    why = integ.check_sizes(path, files) or integ.check_digests(path, files, sorted(files))
    if why is not None:
        return why
    try:  # intact bytes can still be hostile ones (raised), or metadata that does not fit its files
        md = read_metadata_file(os.path.join(path, ".metadata"))
    except (pickle.UnpicklingError, EOFError) as e:
        return f".metadata is garbled ({str(e)[:120]})"
    return integ.storage_shortfall(md, path)


def latest(ckpt_dir: str, finite_only: bool = False) -> str | None:
    """The checkpoint to resume from: the newest intact one with finite weights. None when there is no
    step folder at all. Skipped newer ones are logged with the reason. Checkpoints that exist but are all
    damaged are a CheckpointError (never a silent fresh start); so are intact ones that are all
    non-finite, unless `finite_only` (then None)."""
    dirs = _step_dirs(ckpt_dir)
    if not dirs:
        return None
    damaged, nonfinite = [], []
    for _, path in reversed(dirs):
        why = damage(path)
        if why is not None:
            damaged.append((path, why))
        elif not read_marker(path).get("finite", True):
            nonfinite.append(path)
        else:
            for bad, reason in damaged:
                log.warning("checkpoint %s is damaged (%s): falling back to %s", bad, reason, path)
            for nf in nonfinite:
                log.warning("checkpoint %s holds non-finite weights: resuming from %s, the last finite one",
                            nf, path)
            return path
    if nonfinite and not damaged and finite_only:
        return None
    lines = [f"{p}: {why}" for p, why in damaged] + [f"{p}: non-finite weights" for p in nonfinite]
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be resumed from ({'; '.join(lines)}). Nothing was "
                          "deleted; move the folder away to start over, or restore a copy of a checkpoint")


def save(ckpt_dir: str, step: int, model, optimizer, extra: dict, keep_last: int, finite: bool) -> str:
    """Write a checkpoint atomically and durably (all ranks call this). Returns its final path."""
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    rank = _rank()
    state = {"model": _model_sd(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if rank == 0:
        tidy(ckpt_dir, keep_last)  # leftovers of a killed run (also frees their space before the check)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    # One gather: every rank's estimate and free space (also the barrier after tmp/ exists).
    sizes = _gather((integ.estimate_bytes(state) + (1 << 20), integ.free_bytes(ckpt_dir)))
    need = int(sum(s for s, _ in sizes) * 1.05)
    free = min(f for _, f in sizes)
    if free < need:
        _abort(tmp, rank)
        raise CheckpointError(integ.no_space_message(ckpt_dir, need, free))
    files, err = {}, None
    try:
        with warnings.catch_warnings():  # single-process DCP is intended here, not a misconfiguration
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=tmp)
        torch.save(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
        files = {n: integ.digest_and_sync(os.path.join(tmp, n)) for n in _own_files(tmp, rank)}
    except _WRITE_ERRORS as e:
        err = e
    results = _gather((files, _describe(err)))
    _raise_write_failure(results, err, ckpt_dir, final, tmp, need, rank)
    err = None
    if rank == 0:
        try:
            _commit(ckpt_dir, tmp, final, results, {"step": step, "world_size": _world(), "finite": bool(finite),
                                                   "keep_last": keep_last})
        except OSError as e:
            err = e
    _raise_write_failure(_gather((None, _describe(err))), err, ckpt_dir, final, tmp, need, rank)
    if rank == 0:
        _rotate(ckpt_dir, keep_last)
    return final


def _own_files(tmp: str, rank: int) -> list[str]:
    """Files this rank wrote: DCP names them `__{rank}_*`; its extra; the coordinator writes .metadata.
    (Anything else rank 0 finds in the folder it hashes itself, so a new DCP name is still covered.)"""
    names = [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_")] + [f"extra_rank{rank}.pt"]
    return names + ([".metadata"] if rank == 0 else [])


def _describe(err: BaseException | None):
    """(one-line reason, no_space_kind) of a write error, picklable for the gather; None if no error."""
    if err is None:
        return None
    root = err
    if isinstance(err, CheckpointException) and err.failures:  # DCP wraps each rank's own exception
        root = next(iter(err.failures.values()))[0]
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0][:300] if text else ''}", integ.no_space_kind(err)


def _abort(tmp: str, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def _raise_write_failure(results, err, ckpt_dir, final, tmp, need, rank) -> None:
    failed = [(r, d) for r, (_, d) in enumerate(results) if d is not None]
    if not failed:
        return
    _abort(tmp, rank)  # every rank has stopped writing: the gather above is after their writes
    kept = ", ".join(os.path.basename(p) for _, p in complete_checkpoints(ckpt_dir)) or "none"
    kinds = {kind for _, (_, kind) in failed}
    if "enospc" in kinds or ("short-write" in kinds and integ.free_bytes(ckpt_dir) < need):
        raise CheckpointError(integ.no_space_message(ckpt_dir, need) + f" (kept: {kept})") from err
    r, (msg, _) = failed[0]
    raise CheckpointError(f"writing checkpoint {final} failed on rank {r} ({msg}); removed the partial folder, "
                          f"kept the complete ones ({kept})") from err


def _commit(ckpt_dir: str, tmp: str, final: str, results: list, marker: dict) -> None:
    """Rank 0: digests of all files -> COMPLETE (fsynced) -> fsync folder -> rename -> fsync parent."""
    files: dict = {}
    for rank_files, _ in results:
        files.update(rank_files)
    for name in sorted(set(os.listdir(tmp)) - set(files) - {MARKER}):
        files[name] = integ.digest_and_sync(os.path.join(tmp, name))
    integ.write_durable(os.path.join(tmp, MARKER), json.dumps({**marker, "files": files}, indent=1))
    integ.fsync_dir(tmp)
    if os.path.exists(final):  # the same step written again (a resumed run)
        _remove(final)
    os.replace(tmp, final)
    integ.fsync_dir(ckpt_dir)


def _remove(path: str) -> None:
    """Rename first, so a kill mid-way never leaves a half-deleted folder under a step_N name."""
    trash = path + ".del"
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _rotate(ckpt_dir: str, keep_last: int, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` complete checkpoints and the newest finite one; remove older ones,
    and damaged folders older than everything kept (newer damaged ones stay, for the user to see)."""
    dirs = _step_dirs(ckpt_dir)
    markers = {p: _marker_or_none(p) for _, p in dirs}
    complete = [p for _, p in dirs if markers[p] is not None]
    keep = set(complete[-keep_last:]) | set(protect)
    finite = [p for p in complete if markers[p].get("finite", True)]
    if finite:
        keep.add(finite[-1])
    oldest_kept = min((s for s, p in dirs if p in keep), default=None)
    for s, p in dirs:
        if p in keep or oldest_kept is None or (markers[p] is None and s > oldest_kept):
            continue
        _remove(p)


def tidy(ckpt_dir: str, keep_last: int | None, protect: tuple[str, ...] = ()) -> None:
    """Remove leftovers (rank 0, when no save is in flight): `*.tmp` of a save killed mid-write,
    `*.del` of a removal killed mid-way, and checkpoints beyond `keep_last` (a kill between a save's
    rename and its rotation leaves one too many)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    if keep_last:
        _rotate(ckpt_dir, keep_last, protect)


def load(path: str, model, optimizer) -> dict:
    """Load model + optimizer (re-sharded to this world size) and this rank's extra state, after checking
    every file against its digest. Then (rank 0) remove leftovers beyond the run's keep_last."""
    why = damage(path)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({why}): pass an older step folder, or let resume "
                              "pick the newest intact one")
    paths = _gather(os.path.realpath(path))
    if len(set(paths)) > 1:
        raise CheckpointError(f"ranks chose different checkpoints to load ({sorted(set(paths))}): the "
                              "checkpoint folder changed under the run, or it is not on a shared filesystem")
    state = {"model": _model_sd(model), "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            safe_load(state, path)
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, CheckpointException) as e:
        if isinstance(e, CheckpointException):
            unsafe = [f[0] for f in e.failures.values() if isinstance(f[0], UnsafeCheckpointError)]
            if unsafe:
                raise unsafe[0] from None
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:200]})") from e
    _set_state(path, model, optimizer, state)
    extra = _load_extra(path)
    if _rank() == 0:
        tidy(os.path.dirname(os.path.abspath(path)), read_marker(path).get("keep_last"),
             protect=(os.path.abspath(path),))
    return extra


def _set_state(path: str, model, optimizer, state: dict) -> None:
    opts = StateDictOptions(strict=False)
    missing, unexpected = set_model_state_dict(model, state["model"], options=opts)
    misfit = misfit_text([k for k in missing if not k.startswith(FROZEN_PREFIXES)], sorted(unexpected), [])
    if misfit:
        raise RuntimeError(f"checkpoint {path} does not fit the model: {misfit} (was it written with another config?)")
    set_optimizer_state_dict(model, optimizer, state["optim"])


def _load_extra(path: str) -> dict:
    extra_path = os.path.join(path, f"extra_rank{_rank()}.pt")
    if not os.path.exists(extra_path):  # resumed at a larger world size: this rank is new
        extra_path = os.path.join(path, "extra_rank0.pt")
    try:
        return integ.load_extra(extra_path)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
        raise CheckpointError(f"{extra_path} does not load ({str(e).strip().splitlines()[0][:200]}): the "
                              "checkpoint is damaged") from e


__all__ = ["CheckpointError", "UnsafeCheckpointError", "complete_checkpoints", "damage", "latest", "load",
           "read_marker", "save", "tidy"]
