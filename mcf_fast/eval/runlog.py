"""The written record of a downstream run: eval.log, metrics.jsonl rows, atomic JSON files.

metrics.jsonl holds one JSON object per line, each with a `kind`:
- `train`: every --log-every steps (step, loss and its parts, lr, elapsed_s);
- `eval`: every scoring of the test split (step, epoch, every score): the curve behind best and last;
- `final`: once, after the last step (the last and the best scores with their steps).
A resumed run first drops the rows written after its checkpoint, so the file reads as one
uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os

LOG_NAME = "eval.log"


def plain(obj):
    """`obj` with every non-finite float as None: metrics files stay standard JSON (NaN is not)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def atomic_json(path: str, obj) -> None:
    """Write JSON through a temporary file, fsync, rename: readers see the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plain(obj), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(plain(row)) + "\n")


def keep_row(row: dict, step: int, max_steps: int) -> bool:
    """Whether a row written before a resume from checkpoint `step` stays: everything before it, and at it
    the training row and, mid-run, the evaluation (saved in the checkpoint); the last step's evaluation and
    the final row are written after that checkpoint and so again by the resumed run."""
    s, kind = row.get("step", -1), row.get("kind", "train")
    if s < step:
        return True
    return s == step and (kind == "train" or (kind == "eval" and step < max_steps))


def truncate_rows(path: str, step: int, max_steps: int) -> None:
    """Drop the rows of metrics.jsonl a run resumed from checkpoint `step` writes again (all at step 0)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: never a complete row
            continue
        if isinstance(row, dict) and keep_row(row, step, max_steps):
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


@contextlib.contextmanager
def run_log(out: str):
    """While it is open, every mcf_fast.eval log line also goes to OUT/eval.log (appended across resumes)."""
    logger = logging.getLogger("mcf_fast.eval")
    handler = logging.FileHandler(os.path.join(out, LOG_NAME))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    old = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old)
