"""The run folder's lifecycle: one process (one job) owns it at a time; its config is fixed by its first
checkpoint, not by a start that failed; a finished run is left alone; a fresh start begins clean metrics.

    claim(out, rt)                  make the folder, lock OUT/.lock (rank 0 of a job), barrier
    config_diff(cfg, out, world)    what differs from OUT/config.json (empty when nothing, or none saved)
    check_config(...)               refuse a changed config once a checkpoint exists; save the resolved one
    finished_summary(...)           OUT/summary.json when the same config already ran to its end
    write_json(path, obj)           atomic and durable: temp file, fsync, rename, fsync the folder

A folder that cannot serve as a run folder (unwritable, read-only, a `.lock` that is a symlink or a
hard link, a garbled `config.json`) is a RunFolderError: one line naming the path and the fix, exit 4.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat

import torch.distributed as dist

from .ckpt_integrity import read_json, read_json_or_why, write_json
from .config import Config
from .dcp_safe import CheckpointError
from .runtime import Runtime

log = logging.getLogger("mcf_fast")
LOCK_NAME = ".lock"
IGNORED = {("run", "allow_config_change"), ("run", "progress"),  # never part of a run's identity
           ("run", "interrupt_ckpt_after_s"), ("run", "memory_check")}


class RunFolderError(CheckpointError):
    """The run folder cannot be used (unwritable, a hostile lock, a garbled config): one line, exit 4."""


def _cannot_write(out: str, e: OSError) -> RunFolderError:
    return RunFolderError(f"cannot write in the run folder {out} ({e.strerror or e}): choose a writable --out, "
                          "or fix its permissions")




class RunLock:
    """An exclusive `flock` on OUT/.lock, held for the process's life; the OS drops it when the process
    dies (SIGKILL included), so a killed run never leaves a stale lock. The file names the holder."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd = self._open(out)
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

    def _open(self, out: str) -> int:
        """OUT/.lock opened without following a symlink (its target would be overwritten with our pid)
        and refused unless it is a plain file with one link (a hard link would write through too)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunFolderError(f"{self.path} is a symlink; a run's lock must be a plain file (writing our "
                                     "pid would overwrite its target): remove it and rerun") from None
            if e.errno == errno.EISDIR:
                raise RunFolderError(f"{self.path} is a folder; a run's lock must be a plain file: remove it "
                                     "and rerun") from None
            raise _cannot_write(out, e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "is not a plain file" if not stat.S_ISREG(st.st_mode) else f"has {st.st_nlink} hard links"
            raise RunFolderError(f"{self.path} {what}; a run's lock must be a plain file of its own (writing "
                                 "our pid would write through to the other name): remove it and rerun")
        return fd

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
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise _cannot_write(out, e) from None
        lock = RunLock(out)
        if not os.access(out, os.W_OK | os.X_OK):  # a read-only folder or mount, with a writable lock left in it
            lock.release()
            raise _cannot_write(out, PermissionError(errno.EACCES, "read-only"))
    if rt.distributed:
        dist.barrier()
    return lock


def _saved_config(out: str) -> dict | None:
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return None
    cfg, why = read_json_or_why(path)
    why = why or "not a JSON object of config sections"
    sections = ("model", "optim", "data", "run", "dist")
    if (not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("model", "optim"))
            or not all(isinstance(v, dict) for k, v in cfg.items() if k in sections)):
        raise RunFolderError(f"{path} is empty or garbled ({why}); it records the run's settings: restore it "
                             "from a copy, or delete it and rerun this command to resume with its settings")
    return cfg


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
        try:
            write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "world_size": rt.world_size})
        except OSError as e:
            raise _cannot_write(out, e) from None


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint folder `.../step_NNNNNNNN`."""
    return int(os.path.basename(os.path.normpath(path)).rpartition("_")[2])


def read_summary(out: str) -> dict | None:
    try:
        summary = read_json(os.path.join(out, "summary.json"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def finished_summary(cfg: Config, out: str, world_size: int, latest: str | None) -> dict | None:
    """The saved summary when this exact config already ran to its end (summary.json written, and the
    checkpoint a resume would take, `latest`, is its last step); None otherwise."""
    summary = read_summary(out)
    if summary is None or latest is None or _saved_config(out) is None or config_diff(cfg, out, world_size):
        return None
    return summary if checkpoint_step(latest) == summary.get("steps") else None


__all__ = ["RunLock", "RunFolderError", "claim", "config_diff", "check_config", "finished_summary", "read_summary",
           "checkpoint_step", "write_json", "read_json", "LOCK_NAME"]
