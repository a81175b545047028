"""The one timing / memory / provenance harness every suite of benchmarks/run.py goes through.

- `measure(fn, setup, ...)`: warm-up, then `reps` timed calls, each on fresh inputs from `setup()`
  (built outside the timed region); monotonic clock (`time.perf_counter`) on CPU, CUDA events on GPU.
  Returns the per-call milliseconds; `summarize` gives median and p20 / p80.
- `peak_bytes(fn, device)`: the memory a call needs on top of what is live before it.
  CUDA: `max_memory_allocated` above `memory_allocated` before the call (the caching allocator's
  own count of live tensor bytes). CPU: the process's resident-set high-water mark above its
  resident set before the call: glibc's free pages are first returned to the kernel
  (`malloc_trim(0)`), then the kernel's peak counter is reset (`/proc/self/clear_refs` = 5) so that
  `VmHWM` afterwards is the true peak of this call alone. This counts every page the call touches
  (tensors, allocator slack, library workspaces): what `top` would show, not an allocator estimate.
- `check_equal` / `check_close`: every provider is compared to the reference before it is timed;
  a mismatch raises `ProviderMismatch` and the suite reports the row as failed, never as a ratio.
- `machine_info`, `matmul_peak`: where the numbers come from and what the hardware can do.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

NO_GPU = "not measured: no GPU"


class ProviderMismatch(AssertionError):
    """A provider's output differs from the reference: its timing would compare unequal work."""


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, setup: Callable[[], tuple] | None = None, *, warmup: int = 2, reps: int = 10,
            device: torch.device | str = "cpu") -> list[float]:
    """Milliseconds of `fn(*setup())` for each of `reps` calls after `warmup` untimed ones.

    `setup` runs before every call, outside the timed region, so each call sees fresh inputs (the
    caches and branch predictors cannot learn one tensor). CUDA calls are timed with events on the
    current stream; CPU calls with the monotonic `perf_counter`.
    """
    device = torch.device(device)
    if reps < 1 or warmup < 0:
        raise ValueError(f"measure: reps must be >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    setup = setup or (lambda: ())
    for _ in range(warmup):
        fn(*setup())
    _sync(device)
    out = []
    for _ in range(reps):
        args = setup()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            out.append((time.perf_counter() - t0) * 1e3)
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
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then include reused free pages
        pass


def cpu_peak_supported() -> tuple[bool, str]:
    """(ok, why not): the RSS high-water method needs Linux's /proc/self/clear_refs and VmHWM."""
    if _proc_status_kib("VmHWM") is None:
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
    rss0 = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    hwm = _proc_status_kib("VmHWM")
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
def check_equal(name: str, got, want) -> None:
    """Bit-exact (data movement): tensors or tuples of tensors."""
    got, want = (got if isinstance(got, (tuple, list)) else (got,)), (want if isinstance(want, (tuple, list)) else (want,))
    if len(got) != len(want):
        raise ProviderMismatch(f"{name}: {len(got)} outputs, the reference has {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or not torch.equal(a, b):
            raise ProviderMismatch(f"{name}: output {i} differs from the reference (shape {tuple(a.shape)} "
                                   f"vs {tuple(b.shape)})")


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


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def git_sha() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod, fromlist=["__version__"])
        return getattr(m, "__version__", "?")
    except Exception:  # not installed, or broken install: the report says so
        return None


def machine_info(device: torch.device | str) -> dict:
    """CPU model, cores, threads, bf16 support, GPU, library versions, git sha, date, load."""
    device = torch.device(device)
    flags = cpu_flags()
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_bf16": "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none",
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "gpu": gpu, "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "triton": _version("triton"), "dali": _version("nvidia.dali"), "numpy": _version("numpy"),
        "git": git_sha(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def _busy_s() -> float | None:
    """CPU-seconds all processes have spent busy since boot (/proc/stat: user..steal), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How busy OTHER processes kept the machine over an interval: (all busy CPU-seconds - ours,
    children included) / (wall seconds x cores). 0 = we had the machine to ourselves; timings taken
    while it is well above 0 are slowed by the neighbours, and the report says so."""

    def __init__(self):
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), _own_s()

    def share(self) -> float | None:
        busy = _busy_s()
        if busy is None or self.busy is None:
            return None
        wall = (time.perf_counter() - self.t) * (os.cpu_count() or 1)
        return max(0.0, (busy - self.busy) - (_own_s() - self.own)) / max(wall, 1e-9)


def matmul_peak(dtype: torch.dtype, device: torch.device | str, budget_s: float = 10.0) -> dict:
    """Best measured square-matmul throughput (FLOP/s) over growing sizes, within ~budget_s.

    The MFU denominator: what this machine's GEMM reaches here and now (same threads), not a
    datasheet number. Sizes double from 256 while the next size fits the budget, up to n = 4096
    (CPU) / 8192 (GPU); each size: 2 warm-up products, then repeated products for about a fifth of
    the budget; the best (fastest) product counts, since a peak is what the hardware can reach and
    other processes' load only ever slows a product down. Random data, never zeros.
    """
    device = torch.device(device)
    best, sizes, t_start = 0.0, [], time.perf_counter()
    n_max = 8192 if device.type == "cuda" else 4096
    n = 256
    while n <= n_max:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = measure(lambda: torch.mm(a, b), warmup=1, reps=1, device=device)[0] / 1e3
        reps = max(2, min(50, int((budget_s / 5) / max(first, 1e-6))))
        ms = min(measure(lambda: torch.mm(a, b), warmup=0, reps=reps, device=device))
        rate = 2 * n ** 3 / (ms / 1e3)
        sizes.append({"n": n, "tflops": rate / 1e12, "reps": reps})
        best = max(best, rate)
        left = budget_s - (time.perf_counter() - t_start)
        # the next size costs ~8x per product (n^3): its warm-up and first product, plus a fifth of the budget
        if 3 * 8 * (ms / 1e3) + budget_s / 5 > left:
            break
        n *= 2
    return {"flops": best, "tflops": best / 1e12, "dtype": str(dtype).replace("torch.", ""), "sizes": sizes}


__all__ = ["NO_GPU", "ProviderMismatch", "OtherLoad", "measure", "percentile", "summarize", "peak_bytes", "state_bytes",
           "cpu_peak_supported", "check_equal", "check_close", "machine_info", "matmul_peak", "git_sha"]
