"""Memory per GPU at a world size: the traced step plus the state FSDP2 shards, and the headroom assumed.

One process (world 1) is the traced step itself: every parameter in fp32, autocast's weight casts,
full gradients. A sharded run (world > 1, `train/fsdp.py`) differs in what this module adds back:
  - FSDP2 shards each managed tensor on dim 0, padded to ceil(rows / world) rows per rank; the
    optimizer state and the gradients follow the parameter shards;
  - the frozen teacher is either replicated (in bf16 for bf16 runs) or sharded like the rest;
  - parameters are all-gathered per unit in the compute dtype (bf16 runs) and freed after use, so the
    traced weight casts disappear and the gathered units take their place: the root unit for the whole
    step, two block units at a time (the current and the prefetched), two units' unsharded gradients
    plus their fp32 copies for the reduce-scatter.
The units are `train/fsdp.py`'s own layout (`unit_layout`, recorded by the trace from the built model):
each block of every ViT (online encoder, target encoder, and the teacher when sharded) and then the
ViT itself (its stem and final norm), each decoder block, each MoCo head, and the root that holds
everything else (the decoder's embed, mask token, norm and pixel head).
"""
from __future__ import annotations

import math

from .hardware import GiB

# The caching allocator's reserved bytes above its allocated ones (block rounding, split blocks):
# an assumption until the first GPU run measures it.
GPU_FRAGMENTATION = 0.10
# Outside the allocator: the CUDA context, cuBLAS/cuDNN workspaces and loaded kernels.
GPU_CONTEXT = 1 * GiB
# NCCL's communicators and their buffers, per process, for world > 1.
NCCL_BUFFERS = GiB // 2
# glibc's heap keeps freed tensor pages resident: the vit-s batch-8 fp32 step measured 1170 MiB of RSS
# growth for 856 MiB of live tensors (+37%) with the default malloc settings on this project's CPU box.
CPU_FRAGMENTATION = 0.40

def unit_of(trace, name: str, teacher_sharding: str) -> str | None:
    """The FSDP2 unit holding parameter `name` ('root' for the model's own); None for a replicated
    (unmanaged) teacher tensor. From train/fsdp.py's layout of the traced model."""
    u = trace.layouts[teacher_sharding].unit_of(name)
    return "root" if u == "" else u


def is_teacher_unit(trace, unit: str, teacher_sharding: str) -> bool:
    return trace.layouts[teacher_sharding].is_teacher(unit)


def shard_bytes(numel: int, dim0: int, nbytes: int, world: int) -> int:
    """Bytes one rank holds of a tensor sharded on dim 0 (FSDP2 pads to equal row counts)."""
    if numel <= 1 or world == 1:
        return nbytes
    return math.ceil(dim0 / world) * (numel // dim0) * (nbytes // numel)


def units(trace, teacher_sharding: str) -> dict[str, dict]:
    """{unit: {'numel', 'trainable'}} of the FSDP2 layout (parameters only)."""
    out: dict[str, dict] = {}
    for t in trace.tensors:
        if t.kind not in ("trainable", "frozen", "teacher"):
            continue
        u = unit_of(trace, t.name, teacher_sharding)
        if u is None:
            continue
        d = out.setdefault(u, {"numel": 0, "trainable": 0})
        d["numel"] += t.numel
        d["trainable"] += t.numel if t.kind == "trainable" else 0
    return out


def param_bytes(precision: str) -> int:
    """Bytes per gathered parameter: bf16 runs gather bf16; fp16 and fp32 runs keep fp32 (train/fsdp.py)."""
    return 2 if precision == "bf16" else 4


def peak_view(world: int, precision: str) -> str:
    """Which of the traced maxima applies: everything (one process), activations and weight casts
    (sharded fp16/fp32: fp32 gathered weights are still cast by autocast), activations alone
    (sharded bf16: the gathered weights are already bf16)."""
    if world == 1:
        return "all"
    return "act" if precision == "bf16" else "act+cast"


def per_gpu(trace, world: int, precision: str, teacher_sharding: str, reshard: bool) -> dict:
    """Allocated bytes per GPU by row (see the module docstring); 'total' is their sum."""
    if world == 1:
        at = trace.at_peak.get("all", {})
        rows = {"parameters": trace.bytes_of("trainable", "frozen", "buffer"),
                "teacher": trace.bytes_of("teacher"),
                "gradients": at.get("grad", 0),
                "optimizer state": trace.bytes_of("optim"),
                "activations": at.get("act", 0) + at.get("cast", 0),
                "FSDP buffers": 0}
    else:
        def sharded(*kinds):
            return sum(shard_bytes(t.numel, t.dim0, t.bytes, world) for t in trace.tensors if t.kind in kinds)
        teacher = (sharded("teacher") if teacher_sharding == "shard"
                   else sum(t.numel for t in trace.tensors if t.kind == "teacher") * param_bytes(precision))
        rows = {"parameters": sharded("trainable", "frozen") + trace.bytes_of("buffer"),
                "teacher": teacher,
                "gradients": sharded("trainable"),
                "optimizer state": sharded("optim"),
                "activations": trace.peak[peak_view(world, precision)],
                "FSDP buffers": fsdp_buffers(trace, precision, teacher_sharding, reshard)}
    rows["total"] = sum(rows.values())
    return rows


def fsdp_buffers(trace, precision: str, teacher_sharding: str, reshard: bool) -> int:
    """Gathered parameters and unsharded gradients in flight at once (an upper bound: all at the peak)."""
    u = units(trace, teacher_sharding)
    pb = param_bytes(precision)
    root = u.pop("root", {"numel": 0, "trainable": 0})
    if not u:
        return root["numel"] * pb
    biggest = max(d["numel"] for d in u.values())
    biggest_trainable = max(d["trainable"] for d in u.values())
    # reshard_after_forward=False keeps every unit gathered from its forward to its backward
    gathered = 2 * biggest if reshard else sum(d["numel"] for d in u.values())
    reduce = 2 * biggest_trainable * (pb + 4)  # unsharded gradient + its fp32 copy for the reduce-scatter
    return (root["numel"] + gathered) * pb + reduce


def headroom(allocated: int, capacity: int, world: int, on_gpu: bool, context_in_use: bool = False) -> dict:
    """What the sheet reserves beyond the allocated bytes, and whether the total fits `capacity` bytes.
    `context_in_use`: the capacity is what the device reports free with this process's context already
    made (the pre-flight check), so the context is not reserved twice."""
    frag = GPU_FRAGMENTATION if on_gpu else CPU_FRAGMENTATION
    fixed = 0
    if on_gpu:
        fixed = (0 if context_in_use else GPU_CONTEXT) + (NCCL_BUFFERS if world > 1 else 0)
    needed = int(allocated * (1 + frag)) + fixed
    return {"allocated": allocated, "fragmentation": frag, "fixed": fixed, "needed": needed, "capacity": capacity,
            "fits": needed <= capacity}


__all__ = ["per_gpu", "peak_view", "headroom", "unit_of", "is_teacher_unit", "units", "shard_bytes", "fsdp_buffers",
           "param_bytes", "GPU_FRAGMENTATION", "GPU_CONTEXT", "NCCL_BUFFERS", "CPU_FRAGMENTATION"]
