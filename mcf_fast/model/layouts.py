"""Recognising the checkpoint layouts people actually have, and taking one sub-network out of them.

One place for every caller (eval `--encoder FILE`, `convert FILE`, `--model.teacher checkpoint:FILE`,
`--model.init FILE`). Layouts:
  reference-code MCF   `{'model': {online_encoder.*, target_encoder.* (projectors under .fc.), decoder_*,
                       mask_token, predictor.*, perceptual_loss.model.* (the teacher)}, 'epoch', 'args', ...}`
  mcf_fast model       `convert --out` files: encoder.*, target_encoder.*, projector.*, target_projector.*, ...
  MoCo v3              `{'state_dict': {module.base_encoder.*, module.momentum_encoder.*, ...}}`
  MAE pre-training     `{'model': {patch_embed.*, blocks.*, decoder_*, mask_token}, 'args', ...}`
  ViT state dict       timm / MAE fine-tune / plain, optionally under `encoder.` or `model.`, `.safetensors`
  mcf_fast export      encoder.safetensors (+ encoder.json)
A DDP `module.` prefix on every key is stripped first. Sub-network names: PARTS below; a spec
`FILE#PART` picks one explicitly (`run.pth#target_encoder`).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .checkpoints import infer_vit_arch, load_into, read_file
from .vit import VisionTransformer

PARTS = ("online_encoder", "target_encoder", "teacher", "decoder", "projector", "target_projector", "predictor")
ALIASES = {"encoder": "online_encoder", "online": "online_encoder", "base_encoder": "online_encoder",
           "target": "target_encoder", "momentum_encoder": "target_encoder"}
_HEAD = re.compile(r"^(head|fc_norm|pre_logits|head_drop)(\.|$)")
DECODER_KEY = re.compile(r"^(decoder_|mask_token$)")


@dataclass
class Checkpoint:
    """A recognised file: `parts` maps sub-network names to state dicts in this project's names
    (encoders in timm names, decoder in MAE names, heads as `N.weight` of the Sequential)."""
    path: str
    layout: str
    parts: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # known keys deliberately left out (heads, MoCo MLPs)
    unused: list[str] = field(default_factory=list)   # keys of no known sub-network

    def part(self, name: str) -> dict[str, torch.Tensor]:
        name = ALIASES.get(name, name)
        if name not in self.parts:
            raise ValueError(f"{self.path!r} ({self.layout}) has no {name!r}: it holds {sorted(self.parts)}; pick "
                             f"one with {self.path}#PART")
        return self.parts[name]

    def epoch_text(self) -> str:
        return f", epoch {self.meta['epoch']}" if isinstance(self.meta.get("epoch"), int) else ""


def split_spec(spec: str) -> tuple[str, str | None]:
    """'run.pth#target_encoder' -> ('run.pth', 'target_encoder'); a path that exists as given is kept whole."""
    path, sep, part = spec.rpartition("#")
    if not sep or os.path.exists(spec):
        return spec, None
    part = ALIASES.get(part, part)
    if part not in PARTS:
        raise ValueError(f"unknown sub-network {part!r} in {spec!r}: choose one of {list(PARTS)}")
    return path, part


def _take(sd: dict, prefix: str, drop_head: bool = True, skip: tuple = ()) -> dict:
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items()
            if not (drop_head and _HEAD.match(k)) and not k.startswith(skip)}


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _reference(sd: dict) -> dict:
    """The reference code's names (its projectors live inside the encoders as `.fc`)."""
    parts = {"online_encoder": _take(sd, "online_encoder.", skip=("fc.",)),
             "target_encoder": _take(sd, "target_encoder.", skip=("fc.",)),
             "projector": _sub(sd, "online_encoder.fc.") or _sub(sd, "projector."),
             "target_projector": _sub(sd, "target_encoder.fc.") or _sub(sd, "target_projector."),
             "predictor": _sub(sd, "predictor."),
             "decoder": {k: v for k, v in sd.items() if DECODER_KEY.match(k)},
             "teacher": _take(sd, "perceptual_loss.model.")}
    return parts


def _ours(sd: dict) -> dict:
    return {"online_encoder": _sub(sd, "encoder."), "target_encoder": _sub(sd, "target_encoder."),
            "projector": _sub(sd, "projector."), "target_projector": _sub(sd, "target_projector."),
            "predictor": _sub(sd, "predictor."), "decoder": {k: v for k, v in sd.items() if DECODER_KEY.match(k)},
            "teacher": _sub(sd, "perceptual.teacher.")}


def _plain_vit(sd: dict) -> tuple[str, dict]:
    """A bare ViT, possibly under one wrapper prefix; '' when there is none."""
    for prefix in ("", "encoder.", "model.", "backbone.", "base_encoder."):
        if prefix + "patch_embed.proj.weight" in sd:
            return prefix, {k: v for k, v in _take(sd, prefix).items() if not DECODER_KEY.match(k)}
    return "", {}


_REF = ("online_encoder.", "target_encoder.", "projector.", "target_projector.", "predictor.",
        "perceptual_loss.model.", "decoder_", "mask_token")
_OURS = ("encoder.", "target_encoder.", "projector.", "target_projector.", "predictor.", "perceptual.teacher.",
         "decoder_", "mask_token")


def recognise(sd: dict[str, torch.Tensor], meta: dict) -> tuple[str, dict[str, dict], tuple, tuple]:
    """(layout label, parts, prefixes it reads, prefixes it drops on purpose) of a flat state dict;
    raises listing what it found when no layout fits."""
    if "online_encoder.patch_embed.proj.weight" in sd:
        return "reference-code MCF checkpoint", _reference(sd), _REF, ()
    if "encoder.patch_embed.proj.weight" in sd and ("target_encoder.patch_embed.proj.weight" in sd
                                                    or "decoder_embed.weight" in sd):
        return "mcf_fast model state dict", _ours(sd), _OURS, ()
    if "base_encoder.patch_embed.proj.weight" in sd:
        # MoCo v3's projector (3 layers, inside the encoders' head) and predictor (final BN) are not ours.
        parts = {"online_encoder": _take(sd, "base_encoder."), "target_encoder": _take(sd, "momentum_encoder.")}
        return "MoCo v3 checkpoint", parts, ("base_encoder.", "momentum_encoder."), ("predictor.",)
    prefix, vit = _plain_vit(sd)
    if vit:
        if meta.get("format") == "mcf_fast.encoder.v1" or os.path.exists(_json_beside(meta.get("path", ""))):
            return "mcf_fast encoder export", {"online_encoder": vit}, (prefix,), ()
        dec = {k: v for k, v in sd.items() if DECODER_KEY.match(k)}
        if "decoder_embed.weight" in dec:
            return "MAE pre-training checkpoint", {"online_encoder": vit, "decoder": dec}, ("",), ()
        where = f" under {prefix!r}" if prefix else ""
        return f"ViT state dict{where} (timm / MAE / plain)", {"online_encoder": vit}, (prefix,), ()
    found = Counter(k.split(".")[0] for k in sd)
    raise ValueError(f"unknown checkpoint layout in {meta.get('path')!r}: found {dict(found.most_common(12))} "
                     "(top-level key prefixes: tensor counts); expected a ViT ('patch_embed.proj.weight', "
                     "optionally under encoder./model./module.base_encoder.), a reference-code MCF "
                     "checkpoint (online_encoder.*), an MAE or MoCo v3 checkpoint, or an mcf_fast export")


def _json_beside(path: str) -> str:
    if not path.endswith(".safetensors"):
        return ""
    return os.path.join(os.path.dirname(path) or ".", "encoder.json")


_HEAD_ANY = re.compile(r"(^|\.)(head|fc_norm|pre_logits|head_drop)(\.|$)")


def _accounted(sd: dict, reads: tuple, drops: tuple) -> tuple[list[str], list[str]]:
    """(dropped, unused): keys left out on purpose (classification heads, MoCo's MLPs) vs unknown ones."""
    dropped, unused = [], []
    for k in sd:
        if k.startswith(drops) or (k.startswith(reads) and _HEAD_ANY.search(k)):
            dropped.append(k)
        elif not k.startswith(reads):
            unused.append(k)
    return sorted(dropped), sorted(unused)


def open_checkpoint(path: str) -> Checkpoint:
    """Read any supported file and recognise its layout."""
    sd, meta = read_file(path)
    layout, parts, reads, drops = recognise(sd, meta)
    parts = {k: v for k, v in parts.items() if v}
    dropped, unused = _accounted(sd, reads, drops)
    js = _json_beside(meta.get("path", ""))
    if layout == "mcf_fast encoder export" and os.path.exists(js):
        with open(js) as f:
            meta["encoder_json"] = json.load(f)
    return Checkpoint(meta.get("path", path), layout, parts, meta, dropped, unused)


def arch_text(arch: dict) -> str:
    names = {(192, 12): "ViT-Ti", (384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
    name = names.get((arch["embed_dim"], arch["depth"]), "ViT")
    return (f"{name}/{arch['patch_size']} ({arch['embed_dim']}-d x {arch['depth']} blocks, {arch['num_heads']} "
            f"heads, {arch['img_size']} px)")


def vit_from(ck: Checkpoint, part: str, num_heads: int | None = None) -> tuple[VisionTransformer, str]:
    """A ViT holding sub-network `part` of `ck` (architecture read off the shapes), and one line saying so."""
    sd = dict(ck.part(part))
    heads = num_heads or ck.meta.get("encoder_json", {}).get("num_heads")
    arch = infer_vit_arch(sd, heads)
    if "mlp_ratio" in ck.meta.get("encoder_json", {}):
        arch["mlp_ratio"] = ck.meta["encoder_json"]["mlp_ratio"]
    vit = VisionTransformer(**arch)
    if "pos_embed" not in sd:  # some exports drop the fixed sin-cos table: it is the same everywhere
        sd["pos_embed"] = vit.pos_embed.detach().clone()
    load_into(vit, sd, f"{ck.path}#{ALIASES.get(part, part)}")
    others = [p for p in ck.parts if p != ALIASES.get(part, part)]
    text = (f"{ck.layout}{ck.epoch_text()}: {ALIASES.get(part, part).replace('_', ' ')} {arch_text(arch)}"
            f"{'' if heads else ' (heads = width/64: not in the weights)'}"
            f"{'; also holds ' + ', '.join(others) if others else ''} [{ck.path}]")
    return vit, text


def load_vit(spec: str, prefer: tuple[str, ...] = ("online_encoder",),
             num_heads: int | None = None) -> tuple[VisionTransformer, str, Checkpoint]:
    """`FILE` or `FILE#PART` -> (ViT, description, checkpoint); without #PART the first of `prefer` the file
    holds is taken (the teacher asks for ('teacher', 'online_encoder'))."""
    path, part = split_spec(spec)
    ck = open_checkpoint(path)
    if part is None:
        part = next((p for p in prefer if p in ck.parts), prefer[-1])
    vit, text = vit_from(ck, part, num_heads)
    return vit, text, ck  # callers log `text` once, saying what they use it for


# Where each part sits in `MCFModel.state_dict()` (the frozen teacher is left out, as `convert` does).
MODEL_PREFIX = {"online_encoder": "encoder.", "target_encoder": "target_encoder.", "projector": "projector.",
                "target_projector": "target_projector.", "predictor": "predictor.", "decoder": ""}


def to_model_state(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The file's trainable sub-networks under `MCFModel.state_dict()` names."""
    return {MODEL_PREFIX[p] + k: v for p, sd in ck.parts.items() if p in MODEL_PREFIX for k, v in sd.items()}


__all__ = ["PARTS", "Checkpoint", "split_spec", "recognise", "open_checkpoint", "vit_from", "load_vit",
           "arch_text", "to_model_state"]
