"""`python -m mcf_fast.convert FILE`: a foreign or single-file checkpoint to our plain files.

FILE is anything `layouts` recognises (reference-code MCF, MAE, MoCo v3, timm, mcf_fast). `FILE#PART`
picks the sub-network exported as the encoder (default: the online encoder).
"""
from __future__ import annotations

import os

import torch

from .layouts import load_vit, split_spec, to_model_state
from .vit import save_encoder


def write_model_file(sd: dict, out: str, metadata: dict) -> None:
    """`out` as safetensors (by its extension) or torch.save, through a temp file and a rename, with the
    mode the umask gives every other file (safetensors alone would write it 0600)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, tmp, metadata=metadata)
    else:
        torch.save(sd, tmp)
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, out)


def _umask_mode() -> int:
    """0666 less the process umask, read without changing it (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def convert_file(spec: str, out: str | None, encoder_dir: str | None, num_heads: int | None) -> dict:
    """Write `out` (MCFModel names, teacher excluded) and/or `encoder_dir` (encoder.safetensors + .json)."""
    if not out and not encoder_dir:
        raise ValueError("nothing to do: pass --out FILE and/or --encoder DIR")
    path, part = split_spec(spec)
    vit, text, ck = load_vit(spec, prefer=("online_encoder",), num_heads=num_heads)
    result = {"checkpoint": ck.path, "layout": ck.layout, "description": text,
              "epoch": ck.meta.get("epoch") if isinstance(ck.meta.get("epoch"), int) else None}
    if out:
        write_model_file({k: v.contiguous() for k, v in to_model_state(ck).items()}, out,
                         {"format": "mcf_fast.model.v1", "source": ck.layout})
        result["out"] = out
    if encoder_dir:
        st, _ = save_encoder(vit, encoder_dir, extra={"source": "mcf_fast.convert", "checkpoint": ck.path,
                                                      "layout": ck.layout, "part": part or "online_encoder"})
        result["encoder"] = st
    return result


__all__ = ["convert_file", "write_model_file"]
