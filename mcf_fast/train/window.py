"""The logging window: per-step sums kept on the device between metrics rows, read back once per row.

Steps whose loss or grad norm was not finite were skipped by the optimizer; they add nothing to the
sums, only to the skip counters. A row averages over the finite steps of its window; a window where
every step was skipped has no average, so its losses and grad norm are written as null.

Losses travel by name: the row holds `loss` (the weighted sum), `loss_<name>` for each term of the
model (unweighted, as computed) and `term_weights`, so a new term is logged with no edit here.
"""
from __future__ import annotations

import time
from typing import Mapping

import torch
import torch.distributed as dist

from mcf_fast.procmem import peak_rss_bytes

from .runtime import Runtime
from .step import StepResult

SUM_KEYS = ("loss", "grad_norm", "steps")  # beside one `loss_<name>` per loss term


def term_key(name: str) -> str:
    """The metrics key of loss term `name`."""
    return f"loss_{name}"


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
    return peak_rss_bytes() / 2**20


def reduce(values: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    """Sum (or `op`) over ranks; a no-op in one process."""
    if rt.distributed:
        values = values.to(rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


class MetricsWindow:
    """Device-side sums of the current window plus the run's skip counters; checkpoints carry `state()`.
    `terms`: the model's loss terms, name -> weight (more are added as steps bring them)."""

    def __init__(self, device: torch.device, saved: dict | None = None, terms: Mapping[str, float] | None = None):
        saved = saved or {}
        self.device = device
        self.weights = dict(terms or {})
        keys = ("loss", *map(term_key, self.weights), "grad_norm", "steps")
        window = dict(saved.get("window", {}))
        if "loss_pixel" in keys and "loss_perceptual" in window and "loss_pixel" not in window:
            window["loss_pixel"] = window["loss_perceptual"]  # saved before terms had names: pixel was "perceptual"
        # a saved window's sums continue (resume mid-window); a key the model no longer has is dropped
        # copies: the sums are reset in place after each row, the saved state must not change with them
        self.sums = {k: torch.as_tensor(window[k], device=device).clone() if k in window else self._zero()
                     for k in keys}
        self.consec_bad = torch.as_tensor(saved.get("consec_bad", 0.0), device=device)
        self.skipped_total = torch.as_tensor(saved.get("skipped_total", 0.0), device=device)
        self.t0, self.n = time.perf_counter(), 0  # wall clock and steps of this process in the window

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def add(self, r: StepResult) -> None:
        """Fold one step in, on the device (no host sync)."""
        bad = r.bad
        self.consec_bad = (self.consec_bad + 1) * bad
        self.skipped_total += bad
        good = 1.0 - bad
        self.sums["loss"] += torch.nan_to_num(r.loss) * good
        for name, v in r.terms.items():
            key = term_key(name)
            if key not in self.sums:  # a term the window was not told about: summed from here on
                self.sums[key] = self._zero()
                self.weights[name] = r.weights[name]
            self.sums[key] += torch.nan_to_num(v) * good
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
        keys = list(self.sums)
        vals = dict(zip(keys, reduce(torch.stack([self.sums[k] for k in keys]).float().cpu(), rt).tolist()))
        good = vals["steps"]
        n_ok = max(good, 1.0)
        avg = (lambda k: vals[k] / n_ok) if good > 0 else (lambda k: None)  # None: no finite step
        dt, n = time.perf_counter() - self.t0, max(self.n, 1)
        peak = reduce(torch.tensor([peak_mem_mb(rt.device)]), rt, dist.ReduceOp.MAX if rt.distributed else None)
        terms = [k for k in keys if k not in SUM_KEYS]
        row = {"step": done, "epoch": epoch, "loss": avg("loss"), **{k: avg(k) for k in terms},
               "term_weights": dict(self.weights), "grad_norm": avg("grad_norm"), "lr": lr, "momentum": momentum,
               "images_per_s": n * eff_batch / max(dt, 1e-9),
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


__all__ = ["MetricsWindow", "TimedBatches", "NonFiniteError", "peak_mem_mb", "reduce", "SUM_KEYS", "term_key"]
