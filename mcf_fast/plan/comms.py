"""Collective traffic of one optimizer step per GPU, and the time it needs on the link.

Per micro-batch, with the FSDP2 layout of `train/fsdp.py` (see memory.py):
  - forward all-gathers of every managed unit but the teacher's: the trainable ones and the target
    encoder's (each GPU receives (world - 1) / world of each unit, in the gather dtype);
  - backward all-gathers of the trainable units again (not the root) when parameters are resharded
    after forward;
  - reduce-scatters of the trainable gradients in fp32 (`reduce_dtype`);
  - a sharded teacher is gathered three times: for the original image, for the reconstruction, and
    in the reconstruction's backward;
  - the contrastive keys: an all-gather of [batch, proj_dim] fp32 (with `dist.negatives global`).
A ring collective moves (world - 1) / world of the full size through each GPU's link; NCCL reaches
about 80% of the link rate on large messages (its usual bus-bandwidth share), which the time assumes.
"""
from __future__ import annotations

from .memory import is_teacher_unit, param_bytes, units

LINK_EFFICIENCY = 0.8


def per_step(trace, cfg, world: int, precision: str) -> dict:
    """Bytes each GPU receives per optimizer step, by collective ({} pieces are 0 for world 1)."""
    acc = cfg.optim.accum_steps
    if world == 1:
        return {"gather forward": 0, "gather backward": 0, "reduce-scatter": 0, "teacher gathers": 0, "keys": 0,
                "total": 0}
    share = (world - 1) / world
    pb = param_bytes(precision)
    u = units(trace, cfg.dist.teacher_sharding)
    teacher_units = {k: v for k, v in u.items() if is_teacher_unit(trace, k, cfg.dist.teacher_sharding)}
    model_units = {k: v for k, v in u.items() if k not in teacher_units}
    fwd = sum(v["numel"] for v in model_units.values())
    bwd = (sum(v["numel"] for k, v in model_units.items() if v["trainable"] and k != "root")
           if cfg.dist.reshard_after_forward else 0)
    grads = sum(v["trainable"] for v in model_units.values())
    teacher = 3 * sum(v["numel"] for v in teacher_units.values())
    keys = cfg.optim.batch_size * cfg.model.proj_dim * 4 * (world - 1) if cfg.dist.negatives == "global" else 0
    out = {"gather forward": fwd * pb * share * acc, "gather backward": bwd * pb * share * acc,
           "reduce-scatter": grads * 4 * share * acc, "teacher gathers": teacher * pb * share * acc,
           "keys": keys * acc}
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def link_time(traffic: dict, machine, nodes: int) -> dict:
    """Seconds the step's traffic needs: on NVLink inside one node, on the network port across nodes
    (the 1-D mesh spans all GPUs, so the slowest hop sets the pace)."""
    rate = (machine.network if nodes > 1 else machine.link) * LINK_EFFICIENCY
    if traffic["total"] == 0:
        return {"seconds": 0.0, "rate": rate, "over": "none (one process)"}
    if rate <= 0:
        return {"seconds": float("inf"), "rate": 0.0, "over": "no link known for this machine"}
    over = "the inter-node network" if nodes > 1 else "NVLink"
    return {"seconds": traffic["total"] / rate, "rate": rate, "over": over}


__all__ = ["per_step", "link_time", "LINK_EFFICIENCY"]
