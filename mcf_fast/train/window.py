"""The logging window: per-step sums kept on the device between metrics rows, read back once per row.

Steps whose loss or grad norm was not finite were skipped by the optimizer; they add nothing to the
sums, only to the skip counters. A row averages over the finite steps of its window; a window where
every step was skipped has no average, so its losses and grad norm are written as null.
"""
from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from .runtime import Runtime
from .step import StepResult

SUM_KEYS = ("loss", "loss_perceptual", "loss_contrastive", "grad_norm", "steps")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops (its last finite checkpoint is kept)."""


class TimedBatches:
    """Wraps the loader's iterator; `take_wait()` returns the seconds spent waiting for batches since
    the last call (the data share of a window)."""

    def __init__(self, it):
        self.it, self.wait_s = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.it)
        self.wait_s += time.perf_counter() - t0
        return batch

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reduce(values: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    """Sum (or `op`) over ranks; a no-op in one process."""
    if rt.distributed:
        values = values.to(rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


class MetricsWindow:
    """Device-side sums of the current window plus the run's skip counters; checkpoints carry `state()`."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        saved = saved or {}
        zero = torch.zeros((), device=device)
        self.sums = {k: torch.as_tensor(v, device=device) for k, v in saved.get("window", {}).items()} or \
            {k: zero.clone() for k in SUM_KEYS}
        self.consec_bad = torch.as_tensor(saved.get("consec_bad", 0.0), device=device)
        self.skipped_total = torch.as_tensor(saved.get("skipped_total", 0.0), device=device)
        self.t0, self.n = time.perf_counter(), 0  # wall clock and steps of this process in the window

    def add(self, r: StepResult) -> None:
        """Fold one step in, on the device (no host sync)."""
        bad = r.bad
        self.consec_bad = (self.consec_bad + 1) * bad
        self.skipped_total += bad
        good = 1.0 - bad
        for k, v in zip(("loss", "loss_perceptual", "loss_contrastive"), (r.loss, r.loss_perceptual,
                                                                           r.loss_contrastive)):
            self.sums[k] += torch.nan_to_num(v) * good
        self.sums["grad_norm"] += torch.nan_to_num(r.grad_norm.float()) * good
        self.sums["steps"] += good
        self.n += 1

    def state(self) -> dict:
        return {"window": {k: v.detach().cpu() for k, v in self.sums.items()},
                "consec_bad": self.consec_bad.detach().cpu(), "skipped_total": self.skipped_total.detach().cpu()}

    def consecutive_bad(self) -> int:
        return int(self.consec_bad.item())

    def row(self, done: int, window_steps: int, rt: Runtime, *, epoch: float, lr: float, momentum: float,
            eff_batch: int, data_s: float, data_stats: dict) -> dict:
        """The metrics row of the window ending at step `done` (one host read, all-reduced over ranks),
        then a reset. `window_steps`: optimizer steps the window spans, those before a resume included."""
        vals = reduce(torch.stack([self.sums[k] for k in SUM_KEYS]).float().cpu(), rt)
        good = float(vals[4])
        n_ok = max(good, 1.0)
        avg = (lambda i: float(vals[i]) / n_ok) if good > 0 else (lambda i: None)  # None: no finite step
        dt, n = time.perf_counter() - self.t0, max(self.n, 1)
        peak = reduce(torch.tensor([peak_mem_mb(rt.device)]), rt, dist.ReduceOp.MAX if rt.distributed else None)
        row = {"step": done, "epoch": epoch, "loss": avg(0), "loss_perceptual": avg(1), "loss_contrastive": avg(2),
               "grad_norm": avg(3), "lr": lr, "momentum": momentum, "images_per_s": n * eff_batch / max(dt, 1e-9),
               "step_time_s": dt / n, "data_time_s": data_s / n, "peak_mem_mb": float(peak[0]),
               "skipped_nonfinite": int(self.skipped_total.item()),
               "skipped_in_window": max(0, window_steps - round(good / rt.world_size)),
               "data_skipped": int(data_stats.get("skipped", 0)),
               "data_skipped_by_reason": dict(data_stats.get("skipped_by_reason", {})),
               "data_converted_by_reason": dict(data_stats.get("converted_by_reason", {}))}
        for v in self.sums.values():
            v.zero_()
        self.t0, self.n = time.perf_counter(), 0
        return row


__all__ = ["MetricsWindow", "TimedBatches", "NonFiniteError", "peak_mem_mb", "reduce", "SUM_KEYS"]
