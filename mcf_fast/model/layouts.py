"""Loading a checkpoint in any recognised layout, and taking one sub-network out of it.

One place for every caller (eval `--encoder FILE`, `convert FILE`, `--model.teacher checkpoint:FILE`,
`--model.init FILE`). Which layout a file is (reference code, mcf_fast model, MoCo v3, MAE, a ViT state
dict, an mcf_fast export) is decided by the `LAYOUTS` registry in `layout_kinds.py` from the tensor
names alone; this module reads the tensors (`checkpoints.read_file`: weights-only, a wrapper such as
'state_dict' and a DDP `module.` prefix removed) and maps them. Sub-network names: PARTS below; a spec
`FILE#PART` picks one explicitly (`run.pth#target_encoder`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .checkpoints import infer_vit_arch, load_into, read_file
from .headers import read_small_json
from .layout_kinds import (  # re-exported: callers import the layout vocabulary from here too
    DECODER_KEY,
    LAYOUTS,
    MODEL_PREFIX,
    Reading,
    Take,
    file_part_depth,
    file_part_width,
    json_beside,
    part_depth,
    part_names,
    read_names,
    read_parts,
)
from .vit import VisionTransformer, build_vit

PARTS = ("online_encoder", "target_encoder", "teacher", "decoder", "projector", "target_projector", "predictor")
ALIASES = {"encoder": "online_encoder", "online": "online_encoder", "base_encoder": "online_encoder",
           "target": "target_encoder", "momentum_encoder": "target_encoder"}


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


def recognise(sd: dict[str, torch.Tensor], meta: dict) -> tuple[str, dict[str, dict], tuple, tuple]:
    """(layout label, parts, prefixes it reads, prefixes it drops on purpose) of a flat state dict;
    raises listing what it found when no layout fits."""
    r = read_names(sd, meta)
    parts = {part: {n: sd[k] for n, k in names.items()} for part, names in r.parts.items()}
    return r.label, parts, r.reads, r.drops



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
    js = json_beside(meta.get("path", ""))
    if layout == "mcf_fast encoder export" and os.path.exists(js):
        meta["encoder_json"] = read_small_json(js, "encoder.json")
        if not isinstance(meta["encoder_json"], dict):
            raise ValueError(f"{js}: encoder.json must be a JSON object, got {type(meta['encoder_json']).__name__}")
    return Checkpoint(meta.get("path", path), layout, parts, meta, dropped, unused)


def arch_text(arch: dict) -> str:
    names = {(192, 12): "ViT-Ti", (384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}
    name = names.get((arch["embed_dim"], arch["depth"]), "ViT")
    return (f"{name}/{arch['patch_size']} ({arch['embed_dim']}-d x {arch['depth']} blocks, {arch['num_heads']} "
            f"heads, {arch['img_size']} px)")


def vit_from(ck: Checkpoint, part: str, num_heads: int | None = None,
             attention: str | None = None) -> tuple[VisionTransformer, str]:
    """A ViT holding sub-network `part` of `ck` (architecture read off the shapes), and one line saying so."""
    sd = dict(ck.part(part))
    heads = num_heads or ck.meta.get("encoder_json", {}).get("num_heads")
    arch = infer_vit_arch(sd, heads)
    if "mlp_ratio" in ck.meta.get("encoder_json", {}):
        arch["mlp_ratio"] = ck.meta["encoder_json"]["mlp_ratio"]
    vit = build_vit(arch, attention, source=f"{ck.path}#{ALIASES.get(part, part)}")
    if "pos_embed" not in sd:  # some exports drop the fixed sin-cos table: it is the same everywhere
        sd["pos_embed"] = vit.pos_embed.detach().clone()
    load_into(vit, sd, f"{ck.path}#{ALIASES.get(part, part)}")
    others = [p for p in ck.parts if p != ALIASES.get(part, part)]
    text = (f"{ck.layout}{ck.epoch_text()}: {ALIASES.get(part, part).replace('_', ' ')} {arch_text(arch)}"
            f"{'' if heads else ' (heads = width/64: not in the weights)'}"
            f"{'; also holds ' + ', '.join(others) if others else ''} [{ck.path}]")
    return vit, text


def load_vit(spec: str, prefer: tuple[str, ...] = ("online_encoder",), num_heads: int | None = None,
             attention: str | None = None) -> tuple[VisionTransformer, str, Checkpoint]:
    """`FILE` or `FILE#PART` -> (ViT, description, checkpoint); without #PART the first of `prefer` the file
    holds is taken (the teacher asks for ('teacher', 'online_encoder'))."""
    path, part = split_spec(spec)
    ck = open_checkpoint(path)
    if part is None:
        part = next((p for p in prefer if p in ck.parts), prefer[-1])
    vit, text = vit_from(ck, part, num_heads, attention)
    return vit, text, ck  # callers log `text` once, saying what they use it for


def to_model_state(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The file's trainable sub-networks under `MCFModel.state_dict()` names."""
    return {MODEL_PREFIX[p] + k: v for p, sd in ck.parts.items() if p in MODEL_PREFIX for k, v in sd.items()}


__all__ = ["PARTS", "ALIASES", "Checkpoint", "split_spec", "recognise", "open_checkpoint", "vit_from", "load_vit",
           "arch_text", "to_model_state", "DECODER_KEY", "LAYOUTS", "MODEL_PREFIX", "Reading", "Take", "read_parts",
           "read_names", "part_names", "part_depth", "file_part_depth", "file_part_width", "json_beside"]
