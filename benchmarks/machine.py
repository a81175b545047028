"""Where the numbers come from: the machine, its library versions and commit, how busy other processes
kept it, and what its matrix units reach here and now (`matmul_peak`, the MFU denominator).
Importing it imports no torch (the device kit's `--prep` and `--dry-run` use `git_sha` without it)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha(short: bool = True, recorded: str | None = None) -> str:
    """The checkout's commit (+dirty when tracked files changed); without git, .git/HEAD read directly,
    then the sha recorded in the file `recorded` (a copied tree may have no git at all)."""
    sha = _git("rev-parse", *(["--short=12"] if short else []), "HEAD")
    if sha:
        return sha + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    head = os.path.join(ROOT, ".git", "HEAD")
    if os.path.exists(head):
        ref = open(head).read().strip()
        path = os.path.join(ROOT, ".git", ref[5:]) if ref.startswith("ref: ") else None
        if path is None and ref:
            return ref
        if path and os.path.exists(path):
            return open(path).read().strip()
    if recorded and os.path.exists(recorded):
        return open(recorded).read().strip() + " (recorded at prep)"
    return "unknown (no git, no .git/HEAD" + (f", no {recorded}" if recorded else "") + ")"


def version(mod: str) -> str | None:
    """A package's __version__, '?' when it has none, None when it does not import."""
    try:
        return getattr(__import__(mod, fromlist=["__version__"]), "__version__", "?")
    except Exception:  # noqa: BLE001 - not installed, or a broken install: the report says so
        return None


def machine_info(device) -> dict:
    """CPU model, cores, threads, bf16 support, GPU, library versions, git sha, date, load."""
    import torch
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
        "triton": version("triton"), "dali": version("nvidia.dali"), "numpy": version("numpy"),
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


def matmul_peak(dtype, device, budget_s: float = 10.0) -> dict:
    """Best measured square-matmul throughput (FLOP/s) over growing sizes, within ~budget_s.

    The MFU denominator: what this machine's GEMM reaches here and now (same threads), not a
    datasheet number. Sizes double from 256 while the next size fits the budget, up to n = 4096
    (CPU) / 8192 (GPU); each size: one warm-up product, then repeated products for about a fifth of
    the budget; the best (fastest) product counts, since a peak is what the hardware can reach and
    other processes' load only ever slows a product down. Random data, never zeros.
    """
    import torch

    from .harness import measure
    device = torch.device(device)
    best, sizes, t_start = 0.0, [], time.perf_counter()
    n_max = 8192 if device.type == "cuda" else 4096
    n = 256
    while n <= n_max:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = measure({"mm": lambda: torch.mm(a, b)}, warmup=1, reps=1, device=device)["mm"][0] / 1e3
        reps = max(2, min(50, int((budget_s / 5) / max(first, 1e-6))))
        ms = min(measure({"mm": lambda: torch.mm(a, b)}, warmup=0, reps=reps, device=device)["mm"])
        rate = 2 * n ** 3 / (ms / 1e3)
        sizes.append({"n": n, "tflops": rate / 1e12, "reps": reps})
        best = max(best, rate)
        left = budget_s - (time.perf_counter() - t_start)
        # the next size costs ~8x per product (n^3): its warm-up and first product, plus a fifth of the budget
        if 3 * 8 * (ms / 1e3) + budget_s / 5 > left:
            break
        n *= 2
    return {"flops": best, "tflops": best / 1e12, "dtype": str(dtype).replace("torch.", ""), "sizes": sizes}


__all__ = ["ROOT", "OtherLoad", "machine_info", "matmul_peak", "git_sha", "version", "cpu_model", "cpu_flags"]
