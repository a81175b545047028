"""`--model.init FILE`: start pre-training from a reference-code MCF, MAE or mcf_fast checkpoint.

Each sub-network the file holds is mapped onto the model (online encoder, target encoder, decoder,
projector, target projector, predictor); a part the file lacks keeps its fresh init, except that a
missing target encoder / projector starts as a copy of the loaded online one (as the reference code
starts its target). Every key of a mapped part must fit exactly, and the whole file is checked before
anything is copied: a misfit is one error naming the keys, with nothing loaded. The optimizer is fresh.
The frozen teacher is not taken from here (`--model.teacher checkpoint:FILE` does that).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoints import check_tensors, infer_vit_arch, misfit, misfit_text
from .layouts import DECODER_KEY, Checkpoint, arch_text, open_checkpoint

# Tensors that are fixed sin-cos tables: a file may omit them, the model's own then stay.
_FIXED = ("pos_embed", "decoder_pos_embed")


class _Decoder(nn.Module):
    """A view of the decoder's parameters under their model names, so it loads like any module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.owner = model

    def state_dict(self, *a, **kw):  # noqa: D102 - the model's own decoder tensors
        return {k: v for k, v in self.owner.state_dict().items() if DECODER_KEY.match(k)}

    def load_state_dict(self, sd, strict=True):
        return self.owner.load_state_dict(sd, strict=False)


def _targets(model) -> dict[str, nn.Module]:
    return {"online_encoder": model.encoder, "target_encoder": model.target_encoder, "decoder": _Decoder(model),
            "projector": model.projector, "target_projector": model.target_projector, "predictor": model.predictor}


def _misfits(own: dict, sd: dict, part: str) -> list[str]:
    text = misfit_text(*misfit(own, sd, ignore_missing=_FIXED), limit=8)
    return [f"{part}: {text}"] if text else []


def _arch_hint(ck: Checkpoint, model) -> str:
    try:
        have = arch_text(infer_vit_arch(ck.part("online_encoder"), model.encoder.arch["num_heads"]))
    except (KeyError, ValueError):
        return ""
    return f" The file's online encoder is {have}; the model's is {arch_text(model.encoder.arch)}."


def plan(model, ck: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """{part: state dict to load} after checking that every key of every mapped part fits."""
    if ck.unused:
        raise ValueError(f"--model.init {ck.path!r} ({ck.layout}) has keys of no known sub-network: "
                         f"{ck.unused[:10]}{' ...' if len(ck.unused) > 10 else ''}; nothing was loaded")
    targets = _targets(model)
    todo, problems = {}, []
    for part, sd in ck.parts.items():
        if part not in targets:
            continue
        own = targets[part].state_dict()
        problems += _misfits(own, sd, part)
        todo[part] = {**{k: own[k] for k in _FIXED if k in own and k not in sd}, **sd}
    if problems:
        raise ValueError(f"--model.init {ck.path!r} ({ck.layout}) does not fit the model: {'; '.join(problems)}."
                         f"{_arch_hint(ck, model)} Nothing was loaded.")
    if "online_encoder" not in todo:
        raise ValueError(f"--model.init {ck.path!r} ({ck.layout}) holds no encoder (parts {sorted(ck.parts)})")
    for part, sd in todo.items():
        check_tensors(targets[part].state_dict(), sd, f"{ck.path}#{part}")
    return todo


def init_from_checkpoint(model, path: str) -> list[str]:
    """Load `path` into `model` (an MCFModel); returns the mapping, one line per sub-network."""
    ck = open_checkpoint(path)
    todo = plan(model, ck)
    targets = _targets(model)
    lines = [f"{ck.layout}{ck.epoch_text()} [{ck.path}]"]
    for part, sd in todo.items():
        targets[part].load_state_dict(sd, strict=True)
        lines.append(f"{part} <- file ({len(sd)} tensors)")
    with torch.no_grad():  # a file without a target: it starts as the online network, as in the reference
        for dst, src in (("target_encoder", "online_encoder"), ("target_projector", "projector")):
            if dst not in todo and src in todo:
                for t, o in zip(targets[dst].state_dict().values(), targets[src].state_dict().values()):
                    t.copy_(o)
                lines.append(f"{dst} <- copy of the loaded {src} (the file has none)")
    for part in targets:
        if part not in todo and not any(line.startswith(part + " <-") for line in lines):
            lines.append(f"{part}: fresh init (not in the file)")
    if ck.dropped:
        lines.append(f"left out on purpose: {len(ck.dropped)} tensors ({', '.join(sorted(set(_stem(k) for k in ck.dropped)))})")
    if "teacher" in ck.parts:
        lines.append("teacher in the file: not used here (pass --model.teacher checkpoint:FILE to use it)")
    lines.append("optimizer: fresh")
    return lines


def _stem(key: str) -> str:
    """'perceptual_loss.model.head.weight' -> 'perceptual_loss.model.head' (the module, not the tensor)."""
    return key.rpartition(".")[0] or key


__all__ = ["init_from_checkpoint", "plan"]
