"""The pre-flight memory check `pretrain` runs on a GPU before it builds anything.

`check_fits(cfg, world_size, device)` traces the step the run is about to take (as the cost sheet
does), compares the predicted need per GPU with what the device reports free, and raises `WontFit`
with one line naming the switches that make it fit (each traced) when it does not. CPU runs and
`--run.memory_check false` skip it; a step the trace cannot follow is logged and let through.
"""
from __future__ import annotations

import logging

import torch

from .hardware import GiB

log = logging.getLogger("mcf_fast")


class WontFit(ValueError):
    """The setting needs more GPU memory than the device has; the message says how to make it fit."""


def gpu_kind(name: str) -> str:
    """The sheet's machine for a CUDA device name (its speed anchors; memory comes from the device)."""
    low = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in low:
            return key
    return "h100"


def check_fits(cfg, world_size: int, device) -> None:
    """Raise WontFit when `cfg` at `world_size` cannot fit `device` (see the module docstring)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not getattr(cfg.run, "memory_check", True):
        return
    from mcf_fast.train.runtime import resolve_precision

    from .sheet import Target
    precision = resolve_precision(cfg.run.precision, dev)[0]
    free, _ = torch.cuda.mem_get_info(dev)
    target = Target(gpu=gpu_kind(torch.cuda.get_device_name(dev)), gpus=world_size, memory_bytes=free,
                    context_in_use=True)
    try:
        verdict = verdict_for(cfg, target, precision)
    except Exception as e:  # a check that cannot judge the step must not stop the run
        log.warning("pre-flight memory check skipped: the step could not be traced (%s: %s)", type(e).__name__, e)
        return
    if verdict is not None:
        raise WontFit(verdict)


def verdict_for(cfg, target, precision: str) -> str | None:
    """None when `cfg` fits `target`; else the one-line refusal with the fixes (device-free, testable)."""
    from .sheet import fixes, machine_for, memory_sheet, traced
    m = machine_for(target, precision)
    tr = traced(cfg, precision)
    mem = memory_sheet(tr, cfg, target, precision, m)
    if mem["fits"]:
        return None
    options = [f for f in fixes(cfg, target, precision, m, tr) if f["fits"]]
    how = "; or ".join(f"{f['switch']} ({f['needed'] / GiB:.2f} GiB, work {f['flops_change']:+.0%})"
                       for f in options[:3])
    how = f"it fits with {how}" if how else "no switch fits, alone or together (traced): use more GPUs or a smaller model"
    o = cfg.optim
    return (f"this setting needs about {mem['needed'] / GiB:.2f} GiB per GPU (batch {o.batch_size}, {precision}, "
            f"{target.world} GPU{'s' if target.world > 1 else ''}) but {mem['capacity'] / GiB:.2f} GiB is free: "
            f"{how}. python -m mcf_fast.plan shows the sheet; --run.memory_check false tries anyway")


__all__ = ["check_fits", "verdict_for", "WontFit", "gpu_kind"]
