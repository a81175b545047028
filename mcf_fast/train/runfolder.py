"""The run folder's lifecycle: one process (one job) owns it at a time; its config is fixed by its first
checkpoint, not by a start that failed; a finished run is left alone; a fresh start begins clean metrics.

    claim(out, rt)                  make the folder, lock OUT/.lock (rank 0 of a job), barrier
    config_diff(cfg, out, world)    what differs from OUT/config.json (empty when nothing, or none saved)
    check_config(...)               refuse a changed config once a checkpoint exists; save the resolved one
    finished_summary(...)           OUT/summary.json when the same config already ran to its end
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket

import torch.distributed as dist

from .config import Config
from .runtime import Runtime

log = logging.getLogger("mcf_fast")
LOCK_NAME = ".lock"
IGNORED = {("run", "allow_config_change"), ("run", "progress"),  # never part of a run's identity
           ("run", "interrupt_ckpt_after_s"), ("run", "memory_check")}


class RunLock:
    """An exclusive `flock` on OUT/.lock, held for the process's life; the OS drops it when the process
    dies (SIGKILL included), so a killed run never leaves a stale lock. The file names the holder."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(self.fd)
            self.fd = None
            raise SystemExit(f"error: {out} is in use by another training process ({holder}); wait for it to "
                             "end (rerunning the same command then resumes), or use another --out") from None
        except OSError as e:  # a filesystem without locks (some network mounts): say so, do not block the run
            log.warning("cannot lock %s (%s): running without the one-process-per-run-folder guard", self.path,
                        e.strerror)
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


class _NoLock:
    def release(self) -> None:
        pass


def claim(out: str, rt: Runtime):
    """Create the folder and lock it. Under torchrun only rank 0 locks: the ranks of one job share the
    folder, and a second job's rank 0 fails here (torchrun then stops its other ranks)."""
    lock = _NoLock()
    if rt.is_main:
        os.makedirs(out, exist_ok=True)
        lock = RunLock(out)
    if rt.distributed:
        dist.barrier()
    return lock


def _saved_config(out: str) -> dict | None:
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_diff(cfg: Config, out: str, world_size: int) -> list[str]:
    """'section.key: old -> new' for each difference from the saved config; the per-rank batch may change
    with the world size when the global batch stays the same; a key the saved config predates counts
    as equal when the new value is its default."""
    old = _saved_config(out)
    if old is None:
        return []
    new, default = cfg.to_dict(), Config().to_dict()
    diff = []
    for s, sec in new.items():
        if not isinstance(sec, dict):
            continue
        for k, v in sec.items():
            v = json.loads(json.dumps(v))
            was = old.get(s, {}).get(k, json.loads(json.dumps(default[s].get(k))))
            if (s, k) not in IGNORED and v != was:
                diff.append(f"{s}.{k}: {was!r} -> {v!r}")
    old_world = old.get("world_size", world_size)
    if old_world != world_size and old["optim"]["batch_size"] * old_world == cfg.optim.batch_size * world_size:
        diff = [d for d in diff if not d.startswith("optim.batch_size:")]
    return diff


def check_config(cfg: Config, out: str, rt: Runtime, has_checkpoint: bool) -> None:
    """Refuse a changed config when the folder holds a checkpoint to resume (unless allowed); a folder with
    none starts anew and takes the new config (a start that failed must not lock in its values)."""
    diff = config_diff(cfg, out, rt.world_size)
    old = _saved_config(out)
    if diff and has_checkpoint and not cfg.run.allow_config_change:
        raise SystemExit(f"error: {out} holds a run with another config ({'; '.join(diff[:8])}). Use another "
                         "--out, or pass --run.allow_config_change true to resume with the new values.")
    if diff and not has_checkpoint:
        log.info("%s has no checkpoint yet: a new run starts with this config (%s)", out, "; ".join(diff[:4]))
    elif old is not None and old.get("world_size", rt.world_size) != rt.world_size and not diff:
        log.info("world size %d -> %d with the same global batch %d: resuming", old["world_size"], rt.world_size,
                 cfg.optim.batch_size * rt.world_size)
    if rt.is_main:
        path = os.path.join(out, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**cfg.to_dict(), "world_size": rt.world_size}, f, indent=2)
        os.replace(path + ".tmp", path)


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint folder `.../step_NNNNNNNN`."""
    return int(os.path.basename(os.path.normpath(path)).rpartition("_")[2])


def read_summary(out: str) -> dict | None:
    path = os.path.join(out, "summary.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished_summary(cfg: Config, out: str, world_size: int, latest: str | None) -> dict | None:
    """The saved summary when this exact config already ran to its end (summary.json written, and the
    checkpoint a resume would take, `latest`, is its last step); None otherwise."""
    summary = read_summary(out)
    if summary is None or latest is None or _saved_config(out) is None or config_diff(cfg, out, world_size):
        return None
    return summary if checkpoint_step(latest) == summary.get("steps") else None


__all__ = ["RunLock", "claim", "config_diff", "check_config", "finished_summary", "read_summary",
           "checkpoint_step", "LOCK_NAME"]
