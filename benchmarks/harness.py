"""The one timing / memory / correctness harness every benchmark of mcf_fast goes through.

- `measure(providers, setup, ...)`: warm-up rounds, then `reps` timed rounds; a round calls every
  provider once (round-robin, so load from other processes hits them alike), each call on fresh inputs
  from `setup()` built outside the timed region. Clock: the monotonic `time.perf_counter` on CPU,
  CUDA events on GPU. With a `Budget` it refuses a measurement that would not fit before timing
  anything, and ends one early (fewer samples) when load makes the rounds slower than estimated.
- `PhaseTimer`: the same clocks for the phases inside one call (data / forward / backward / ...).
- `summarize`: median and p20 / p80 of the samples.
- `peak_bytes(fn, device)`: the memory a call needs on top of what is live before it. CUDA:
  `max_memory_allocated` above `memory_allocated` before the call. CPU: the process's resident-set
  high-water mark above its resident set before the call: glibc's free pages are first returned to
  the kernel (`malloc_trim(0)`), then the kernel's peak counter is reset (`/proc/self/clear_refs` = 5)
  so that `VmHWM` afterwards is the peak of this call alone: every page it touches (tensors,
  allocator slack, library workspaces), what `top` would show, not an allocator estimate.
- `check_equal` / `check_close`: every provider is compared to its reference before it is timed; a
  mismatch raises `ProviderMismatch`, and the report shows the row as failed, never as a ratio.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable

import torch

from mcf_fast.procmem import status_kib

from .budget import Budget, BudgetSpent

NO_GPU = "not measured: no GPU"


class ProviderMismatch(AssertionError):
    """A provider's output differs from the reference: its timing would compare unequal work."""


# ----------------------------------------------------------------------------- clocks
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_ms(fn: Callable, args: tuple, device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on the current stream, or the monotonic perf_counter."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


class PhaseTimer:
    """Marks phase boundaries inside one call: perf_counter on CPU (ops are synchronous), CUDA events on GPU.
    `result()` sums the time between consecutive marks by the later mark's name."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []
        self.mark("start")

    def mark(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def result(self) -> dict:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return out


# ----------------------------------------------------------------------------- timing
def measure(providers: dict[str, Callable], setup: Callable[[], tuple] | None = None, *, warmup: int = 2,
            reps: int = 10, device: torch.device | str = "cpu", budget: Budget | None = None,
            extra_calls: int = 0, min_reps: int = 3) -> dict[str, list[float]]:
    """Milliseconds of `fn(*setup())` per provider, {name: [ms of each timed round]}.

    `warmup` untimed rounds, then `reps` timed ones. With `budget`, the first round (warm-up, or the
    first timed one when warmup is 0) is the estimate: when the remaining rounds plus `extra_calls`
    more calls of each provider (the caller's, e.g. a peak-memory call) would not fit in what is
    left, `BudgetSpent` is raised before any timing; after `min_reps` timed rounds, a round that
    would no longer fit ends the measurement (fewer samples; each summary carries its n).
    """
    device = torch.device(device)
    if reps < 1 or warmup < 0 or not providers:
        raise ValueError(f"measure: needs providers, reps >= 1 and warmup >= 0, got {len(providers)} providers, "
                         f"reps={reps} warmup={warmup}")
    setup = setup or (lambda: ())
    if budget is not None and budget.spent():
        raise BudgetSpent("the budget was spent before this measurement")
    out = {name: [] for name in providers}
    for r in range(warmup + reps):
        t_round = time.perf_counter()
        for name, fn in providers.items():
            args = setup()
            _sync(device)
            ms = _call_ms(fn, args, device)
            if r >= warmup:
                out[name].append(ms)
        round_s = time.perf_counter() - t_round
        if budget is None:
            continue
        rounds_left = warmup + reps - r - 1
        if r == 0:
            budget.require(round_s * (rounds_left + extra_calls), f"{rounds_left + extra_calls} more rounds at "
                           f"{round_s:.2f} s each")
        elif r >= warmup + min(min_reps, reps) - 1 and rounds_left and round_s * (1 + extra_calls) > budget.left():
            break  # load made the rounds slower than the estimate: keep the samples taken
    return out


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict:
    """{'median_ms', 'p20_ms', 'p80_ms', 'n'} of a list of milliseconds."""
    return {"median_ms": statistics.median(samples_ms), "p20_ms": percentile(samples_ms, 20),
            "p80_ms": percentile(samples_ms, 80), "n": len(samples_ms)}


# ----------------------------------------------------------------------------- memory
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then include reused free pages
        pass


def cpu_peak_supported() -> tuple[bool, str]:
    """(ok, why not): the RSS high-water method needs Linux's /proc/self/clear_refs and VmHWM."""
    if status_kib("VmHWM") is None:
        return False, "not measured: /proc/self/status has no VmHWM (not Linux)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        return False, f"not measured: cannot reset the RSS peak via /proc/self/clear_refs ({e.strerror})"
    return True, ""


def peak_bytes(fn: Callable, device: torch.device | str = "cpu") -> int | None:
    """Bytes the call `fn()` needs above what is live before it (see the module docstring for how);
    None where the platform offers no way to measure it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    ok, _ = cpu_peak_supported()
    if not ok:
        fn()
        return None
    _malloc_trim()
    rss0 = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    hwm = status_kib("VmHWM")
    return max(0, hwm - rss0) * 1024


def state_bytes(*objs) -> int:
    """Bytes held by modules' parameters and buffers, optimizers' state tensors and plain tensors
    (each storage counted once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        else:
            add(o)
    return total


# ----------------------------------------------------------------------------- checks
def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_equal(name: str, got, want) -> None:
    """Bit-exact (data movement): tensors or tuples of tensors."""
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        raise ProviderMismatch(f"{name}: {len(got)} outputs, the reference has {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            raise ProviderMismatch(f"{name}: output {i} differs from the reference (shape {tuple(a.shape)} "
                                   f"{a.dtype} vs {tuple(b.shape)} {b.dtype})")


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> float:
    """|got - want| <= atol + rtol * |want| elementwise; returns the worst absolute error."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ProviderMismatch(f"{name}: shape {tuple(got.shape)} vs the reference's {tuple(want.shape)}")
    err = (got - want).abs()
    if not torch.isfinite(got).all() or bool((err > atol + rtol * want.abs()).any()):
        raise ProviderMismatch(f"{name}: differs from the reference by {float(err.max()):.3g} "
                               f"(allowed {atol:g} + {rtol:g} * |ref|)")
    return float(err.max())


__all__ = ["NO_GPU", "ProviderMismatch", "PhaseTimer", "measure", "percentile", "summarize", "peak_bytes",
           "state_bytes", "cpu_peak_supported", "check_equal", "check_close"]
