"""The step measured for real, to put beside the sheet's prediction: peak bytes and seconds per step.

One process, the model built as the loop builds it, `TrainStep` on random images. The peak is the
bytes a step needs above what is live before it (model, optimizer state):
  CUDA  the caching allocator's own count (peak allocated bytes above those before the step), beside
        the absolute allocated and reserved peaks (what calibrates the sheet's fragmentation allowance);
  CPU   the resident-set high-water mark above the resident set before the step. glibc's heap would keep
        freed tensor pages resident (the default settings measured +37% over the live bytes), so the
        mmap threshold is pinned at 128 KiB first: every tensor-sized block then leaves the resident set
        when freed, as it leaves a GPU allocator's count.
"""
from __future__ import annotations

import ctypes
import time
from types import SimpleNamespace

import torch

from mcf_fast.procmem import status_kib

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Freed blocks above `nbytes` go back to the kernel at once (glibc only; False elsewhere)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def cpu_measurable() -> tuple[bool, str]:
    """(ok, why not): the CPU peak needs glibc (to pin the mmap threshold) and Linux's resettable VmHWM."""
    if not pin_mmap_threshold():
        return False, "not glibc: freed tensors would stay in the resident set (mallopt unavailable)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError as e:
        return False, f"no resettable resident-set peak here ({e})"
    return True, ""


def _status_kib(key: str) -> int:
    kib = status_kib(key)
    if kib is None:
        raise OSError(f"/proc/self/status has no {key}")
    return kib


def _cpu_peak(fn) -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def _cuda_peaks(fn, device) -> tuple[int, dict]:
    """The allocated high-water mark of `fn` above the bytes allocated before it, and the absolute peaks
    of allocated and reserved bytes: reserved / allocated is the fragmentation the sheet's GPU headroom
    assumes."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    st = torch.cuda.memory_stats(device)
    peaks = {"allocated": st["allocated_bytes.all.peak"], "reserved": st["reserved_bytes.all.peak"]}
    return max(0, peaks["allocated"] - before), peaks


def measure_step(cfg, precision: str, device="cpu", warmup: int = 1) -> dict:
    """{'peak_bytes', 'step_s', 'images_per_s'} of one optimizer step of `cfg` after `warmup` steps."""
    from mcf_fast.train.optim import build_optimizer
    from mcf_fast.train.runtime import Runtime
    from mcf_fast.train.step import TrainStep

    from .trace import build, traceable
    dev = torch.device(device)
    if dev.type == "cpu":
        ok, why = cpu_measurable()
        if not ok:
            raise RuntimeError(f"cannot measure a CPU step's peak: {why}")
    cfg = traceable(cfg)
    o, B, S = cfg.optim, cfg.optim.batch_size, cfg.model.img_size
    with torch.random.fork_rng(devices=[]):
        model = build(cfg.model, cfg.run.seed).to(dev).train()
    optimizer = build_optimizer(model, 1e-4, o.weight_decay, (o.beta1, o.beta2), dev, o.decay_tokens)
    step = TrainStep(model, optimizer, cfg, Runtime(dev, precision, 0, 1, 0))
    ids = iter(range(1 << 40))

    def batches():
        while True:
            n = next(ids)
            yield SimpleNamespace(images=torch.randn(B, 3, S, S, device=dev),
                                  sample_ids=torch.arange(n * B, (n + 1) * B, device=dev))
    it = batches()
    for i in range(warmup):
        step(it, i, 1e-4, o.momentum)
    t0 = time.perf_counter()
    run = lambda: step(it, warmup, 1e-4, o.momentum)  # noqa: E731
    peak, absolute = _cuda_peaks(run, dev) if dev.type == "cuda" else (_cpu_peak(run), None)
    dt = time.perf_counter() - t0
    return {"peak_bytes": peak, "device_peaks": absolute, "step_s": dt, "images_per_s": B * o.accum_steps / dt}


__all__ = ["measure_step", "pin_mmap_threshold", "cpu_measurable"]
