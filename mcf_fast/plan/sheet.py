"""The cost sheet as a dict: FLOPs, memory per GPU, speed range, traffic, loader cores, disk, and fixes.

`plan_sheet(cfg, Target(...))` is what `python -m mcf_fast.plan` prints and what a device check can
put beside its measurements. Every number says where it comes from: traced (the real step on fake
tensors), measured (on this machine, now), or assumed (hardware.py, memory.py, comms.py).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass

from . import comms, hardware, memory, storage
from . import loader as loader_rate
from .trace import trace_step


@dataclass
class Target:
    """The cluster and the job the sheet plans for."""
    gpu: str = "h100"  # h100 | h200 | a100 | cpu
    gpus: int = 1  # per node
    nodes: int = 1
    images: int | None = None  # per epoch (None: the synthetic set's size when data.path is '')
    epochs: float | None = None  # None: --optim.epochs
    loader_rate: float | None = None  # decode + augment images/s per core (None: measure it here)
    source_px: int | None = None  # side of the stored images (None: data.img_size)
    image_kb: float | None = None  # stored bytes per image in KiB (None: the measured sample's)
    memory_bytes: int | None = None  # device memory to plan against (None: the machine's datasheet size)
    context_in_use: bool = False  # memory_bytes is what a live device reports free (the pre-flight check)

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


def machine_for(target: Target, precision: str) -> hardware.Machine:
    if target.gpu != "cpu":
        m = hardware.GPUS[target.gpu]
    else:
        m = hardware.cpu_machine(_host_memory(), *_cpu_peak(precision))
    return dataclasses.replace(m, memory=target.memory_bytes) if target.memory_bytes else m


def _host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemTotal")


def _cpu_peak(precision: str) -> tuple[dict, str]:
    """This CPU's square-matmul rate at `precision` over about a second (all of torch's threads)."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(1024, 1024, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t0))
    return {precision: best}, f"measured here now: best 1024^3 {precision} matmul, {best / 1e9:.0f} GFLOP/s"


def resolve_precision(cfg, target: Target) -> tuple[str, str]:
    """The precision the run would pick on the target (the data-centre GPUs listed all have bf16)."""
    p = cfg.run.precision
    if target.gpu == "cpu":
        import torch

        from mcf_fast.train.runtime import resolve_precision as on_device
        return on_device(p, torch.device("cpu"))
    return ("bf16", "the GPU supports bf16") if p == "auto" else (p, "requested")


_TRACES: dict = {}


def traced(cfg, precision: str):
    """trace_step, memoised on the config and precision (the fixes re-trace variants)."""
    key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), precision)
    if key not in _TRACES:
        t0 = time.perf_counter()
        tr = trace_step(cfg, precision)
        tr.seconds = time.perf_counter() - t0
        _TRACES[key] = tr
    return _TRACES[key]


def memory_sheet(tr, cfg, target: Target, precision: str, m: hardware.Machine) -> dict:
    rows = memory.per_gpu(tr, target.world, precision, cfg.dist.teacher_sharding, cfg.dist.reshard_after_forward)
    at = tr.at_peak.get(memory.peak_view(target.world, precision), {})
    room = memory.headroom(rows["total"], m.memory, target.world, target.gpu != "cpu", target.context_in_use)
    return {"rows": rows, **room, "peak_part": at.get("part"), "peak_phase": at.get("phase"),
            "peak_by_part": at.get("by_part", {})}


def speed_sheet(tr, cfg, target: Target, precision: str, m: hardware.Machine, total_steps: int | None) -> dict:
    """Images/s per GPU, seconds per optimizer step and hours for the run at each MFU of the range."""
    peak = m.peak.get(precision) or next(iter(m.peak.values()))
    mfu = hardware.CPU_MFU if target.gpu == "cpu" else m.mfu_range()
    per_step_images = cfg.optim.batch_size * cfg.optim.accum_steps  # per GPU
    out = {"peak_flops": peak, "peak_source": m.peak_source, "range": {}}
    for name, (share, source) in mfu.items():
        ips = share * peak / tr.flops_per_image
        step_s = per_step_images / ips
        out["range"][name] = {"mfu": share, "source": source, "images_per_s_per_gpu": ips, "step_s": step_s,
                              "hours": total_steps * step_s / 3600 if total_steps else None}
    return out


def plan_sheet(cfg, target: Target, *, with_fixes: bool = True, with_loader: bool = True) -> dict:
    """The whole sheet for a validated Config on `target` (see the module docstring). `with_loader=False`
    leaves the loader out (its rate is measured for about a second): 'loader' is then None."""
    precision, why = resolve_precision(cfg, target)
    m = machine_for(target, precision)
    tr = traced(cfg, precision)
    images = target.images or (cfg.data.synthetic_size if not cfg.data.path else None)
    epochs = target.epochs if target.epochs is not None else cfg.optim.epochs
    o = cfg.optim
    eff_batch = o.batch_size * o.accum_steps * target.world
    total_steps = o.max_steps or (optimizer_steps(images, epochs, o.batch_size, o.accum_steps, target.world)
                                  if images else None)
    speed = speed_sheet(tr, cfg, target, precision, m, total_steps)
    traffic = comms.per_step(tr, cfg, target.world, precision)
    link = comms.link_time(traffic, m, target.nodes)
    likely_step = speed["range"]["likely"]["step_s"]
    rate = _loader(cfg, target) if with_loader else None
    ips = {k: v["images_per_s_per_gpu"] for k, v in speed["range"].items()}
    bpi = target.image_kb * 1024 if target.image_kb else (rate or {}).get("bytes_per_image")
    mem = memory_sheet(tr, cfg, target, precision, m)
    sheet = {
        "run": {"preset": cfg.preset, "machine": m.name, "gpus_per_node": target.gpus, "nodes": target.nodes,
                "world": target.world, "precision": precision, "precision_why": why, "batch": o.batch_size,
                "accum_steps": o.accum_steps, "effective_batch": eff_batch, "images_per_epoch": images,
                "epochs": epochs, "optimizer_steps": total_steps, "max_steps": o.max_steps, "memory": m.memory,
                "teacher_sharding": cfg.dist.teacher_sharding},
        "flops": {"per_image": tr.flops_per_image,
                  "by_part": {k: v / (tr.batch * tr.micro_steps) for k, v in tr.flops_by_part.items()},
                  "source": "counted by FlopCounterMode on the real TrainStep, fake tensors"},
        "memory": mem,
        "speed": speed,
        "comms": {"per_step": traffic, **link, "share_of_likely_step": link["seconds"] / likely_step},
        "loader": {**rate, "cores_per_gpu": {k: loader_rate.cores_needed(v, rate) for k, v in ips.items()}}
        if rate else None,
        "storage": {**storage.job_storage(tr, cfg, total_steps or 0, images, bpi),
                    "bytes_source": "given" if target.image_kb else "measured"},
        "trace": {"seconds": tr.seconds, "micro_steps": tr.micro_steps, "unlabelled_parts": tr.missing_parts,
                  "notes": tr.notes},
        "fixes": [],
    }
    if with_fixes and not mem["fits"]:
        sheet["fixes"] = fixes(cfg, target, precision, m, tr)
    return sheet


def optimizer_steps(images: int, epochs: float, batch: int, accum: int, world: int) -> int:
    """The run's length as the loop computes it: full steps only (each rank's epoch tail is dropped)."""
    per_epoch = max(1, images // (world * batch) // accum)
    return max(1, int(round(epochs * per_epoch)))


def _loader(cfg, target: Target) -> dict:
    if target.loader_rate:
        return loader_rate.given_rate(target.loader_rate, target.image_kb * 1024 if target.image_kb else None)
    return loader_rate.measure_rate(cfg.data, target.source_px or cfg.data.img_size)


def _variants(cfg, target: Target):
    """(switch text, changed config, halves the batch) for each way to fit: the switches, then the batch
    halved with the accumulation doubled (the same images per optimizer step)."""
    kind = cfg.model.teacher.partition(":")[0]
    has_teacher = kind in ("checkpoint", "random")  # a teacher of its own (ema's is the target encoder)
    out = []
    if (has_teacher or kind == "ema") and not cfg.model.teacher_grad_ckpt:
        out.append(("--model.teacher_grad_ckpt true", _with(cfg, model={"teacher_grad_ckpt": True}), False))
    if has_teacher and target.world > 1 and cfg.dist.teacher_sharding != "shard":
        out.append(("--dist.teacher_sharding shard", _with(cfg, dist={"teacher_sharding": "shard"}), False))
    if not cfg.model.grad_ckpt:
        out.append(("--model.grad_ckpt true", _with(cfg, model={"grad_ckpt": True}), False))
    b, a = cfg.optim.batch_size, cfg.optim.accum_steps
    while b % 2 == 0 and b // 2 >= 2:  # BatchNorm in the heads needs two samples
        b, a = b // 2, a * 2
        out.append((f"--optim.batch_size {b} --optim.accum_steps {a}",
                    _with(cfg, optim={"batch_size": b, "accum_steps": a}), True))
    return out


def _with(cfg, **sections):
    c = copy.deepcopy(cfg)
    for sec, vals in sections.items():
        for k, v in vals.items():
            setattr(getattr(c, sec), k, v)
    return c


def fixes(cfg, target: Target, precision: str, m: hardware.Machine, base) -> list[dict]:
    """Each switch that could make the setting fit, traced, with its predicted memory and cost; when
    none fits alone, all of them together (then with halved batches). Halving stops at the first fit."""
    def rows(variants):
        out = []
        for text, c, halves in variants:
            out.append(_fix_row(text, c, target, precision, m, base))
            if halves and out[-1]["fits"]:
                break
        return out
    out = rows(_variants(cfg, target))
    if not any(f["fits"] for f in out):
        both = _with(cfg, model={"grad_ckpt": True, "teacher_grad_ckpt": True},
                     dist={"teacher_sharding": "shard" if target.world > 1 else cfg.dist.teacher_sharding})
        out += rows([("all the switches above", both, False)]
                    + [(f"all the switches and {t}", c, h) for t, c, h in _variants(both, target)])
    return out


def _fix_row(text, c, target, precision, m, base) -> dict:
    tr = traced(c, precision)
    mem = memory_sheet(tr, c, target, precision, m)
    likely = m.mfu_range()["likely"][0] if target.gpu != "cpu" else hardware.CPU_MFU["likely"][0]
    peak = m.peak.get(precision) or next(iter(m.peak.values()))
    traffic = comms.per_step(tr, c, target.world, precision)["total"]
    return {"switch": text, "needed": mem["needed"], "fits": mem["fits"],
            "flops_change": tr.flops_per_image / base.flops_per_image - 1,
            "images_per_s_per_gpu": likely * peak / tr.flops_per_image, "traffic_per_step": traffic}


__all__ = ["plan_sheet", "Target", "fixes", "traced", "machine_for", "resolve_precision"]
