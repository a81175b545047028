"""What a run tells its user: metrics.jsonl lines, TensorBoard events, a progress bar (or plain lines)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from .window import term_key

log = logging.getLogger("mcf_fast")


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when each record is written: a handler bound to the
    stream of its setup would write into a closed or replaced stream later in the same process (a
    notebook cell, a test harness, a caller that redirects stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def setup_logging(out_dir: str | None, rank: int) -> None:
    """Console + OUT/train.log on rank 0; other ranks only warn."""
    root = logging.getLogger("mcf_fast")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    h = ConsoleHandler()
    h.setFormatter(fmt)
    root.addHandler(h)
    if out_dir and rank == 0:
        fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines written after the checkpoint we resume from, so the file reads as one clean run."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a half-written last line from a killed run
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class RunLogger:
    """Rank 0 writes; other ranks hold a disabled instance so call sites stay unconditional."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, enabled: bool, progress: str,
                 tensorboard: bool):
        self.enabled = enabled
        self.total = total_steps
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        self.t0 = time.perf_counter()
        self.start_step = start_step
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1)
            except ImportError as e:
                log.warning("TensorBoard events off: %s (pip install tensorboard)", e)
        mode = progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="pretrain", file=sys.stderr)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.mode == "lines":
            done = row["step"] - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - row["step"])
            log.info("step %d/%d  %s  lr %.2e  %.1f img/s  eta %s%s",
                     row["step"], self.total, loss_text(row), row["lr"], row["images_per_s"], _hms(eta),
                     f"  ({row['skipped_in_window']} non-finite steps skipped)" if row.get("skipped_in_window")
                     else "")

    def advance(self, n: int, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def image(self, tag: str, chw, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, chw, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def loss_text(row: dict) -> str:
    """The loss and its parts so that they add up for a reader: each term's weighted contribution, then
    its weight and unweighted value, e.g. 'loss 94.3290 = perceptual 93.5142 (1000 x 0.09351) + contrastive
    0.8148 (1 x 0.8148)'. A window whose every step was non-finite has no loss: 'loss n/a'."""
    if row.get("loss") is None:
        return "loss n/a"
    parts = []
    for name, w in row.get("term_weights", {}).items():
        v = row.get(term_key(name))
        if v is not None:
            parts.append(f"{name} {w * v:.4f} ({w:g} x {v:.4g})")
    return f"loss {row['loss']:.4f}" + (" = " + " + ".join(parts) if parts else "")


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
