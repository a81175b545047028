"""Disk for the job: checkpoints (what `train/checkpoint.py` writes), the exported encoder, the shards.

A checkpoint holds the model without the frozen teacher (it is rebuilt from the config) and the
optimizer state, in fp32, whatever the world size (DCP writes each rank's shard; together they are
the whole). While a new one is written the `keep_last` complete ones stay, so the run needs room for
keep_last + 1 at its peak (the checkpoint code refuses to start a save without it).
"""
from __future__ import annotations

import math


def checkpoint_bytes(trace) -> int:
    return trace.bytes_of("trainable", "frozen", "buffer", "optim")


def encoder_bytes(trace) -> int:
    return sum(t.bytes for t in trace.tensors if t.name.startswith("encoder."))


def job_storage(trace, cfg, total_steps: int, images: int | None, bytes_per_image: float | None) -> dict:
    ck = checkpoint_bytes(trace)
    keep = cfg.run.keep_last
    out = {"checkpoint": ck, "checkpoints_kept": keep, "checkpoint_disk": ck * (keep + 1),
           "checkpoints_written": math.ceil(total_steps / cfg.run.ckpt_every) if total_steps else None,
           "encoder_export": encoder_bytes(trace), "bytes_per_image": bytes_per_image,
           "shards": int(images * bytes_per_image) if images and bytes_per_image else None}
    return out


__all__ = ["checkpoint_bytes", "encoder_bytes", "job_storage"]
