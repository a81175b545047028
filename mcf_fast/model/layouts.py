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

Each layout is an entry of the `LAYOUTS` registry: a class with `name`, `summary`, `generic` and
`read(names, meta) -> Reading | None`, which recognises a file from its tensor names alone and says
where each sub-network sits (`Take`). Loading (`recognise`) and the header-only pre-flight checks
(`part_depth`) ask the same entries, so a new layout is one class and one `register` line.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from mcf_fast.registry import Registry

from .checkpoints import infer_vit_arch, load_into, read_file, unwrap_keys
from .headers import checkpoint_keys, read_small_json
from .vit import VisionTransformer, build_vit

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


@dataclass(frozen=True)
class Take:
    """Where one sub-network sits in a flat state dict: the names under `prefix` (stripped), except
    those under `skip`, classification heads (`drop_head`) and names matching `exclude`; or, with
    `match`, the whole names that match (MAE's decoder keeps its top-level names)."""
    prefix: str = ""
    skip: tuple[str, ...] = ()
    drop_head: bool = False
    exclude: re.Pattern | None = None
    match: re.Pattern | None = None

    def names(self, keys) -> dict[str, str]:
        """{name in the sub-network: name in the file}."""
        if self.match is not None:
            return {k: k for k in keys if self.match.match(k)}
        out = {}
        for k in keys:
            if not k.startswith(self.prefix):
                continue
            n = k[len(self.prefix):]
            if n.startswith(self.skip):
                continue
            if (self.drop_head and _HEAD.match(n)) or (self.exclude is not None and self.exclude.match(n)):
                continue
            out[n] = k
        return out


@dataclass
class Reading:
    """A layout's reading of a file's names: its label, {part: {sub-network name: file name}}, the key
    prefixes it reads and those it leaves out on purpose."""
    label: str
    parts: dict[str, dict[str, str]]
    reads: tuple[str, ...]
    drops: tuple[str, ...] = ()


# Checkpoint layouts: each entry recognises a file from its tensor names alone (so the pre-flight checks
# can ask from a header) and says where each sub-network sits. Specific layouts are tried in registration
# order, then the `generic` ones (a bare ViT, which many layouts also contain) in theirs.
LAYOUTS: Registry = Registry("checkpoint layout", "FILE")


def read_parts(label: str, keys, wheres: dict, reads: tuple, drops: tuple = ()) -> Reading:
    """A Reading from {part: Take or (Take, ...)}: the first alternative that finds names wins (what a
    layout's `read` returns once it has recognised the names)."""
    parts = {}
    for part, where in wheres.items():
        for take in (where if isinstance(where, tuple) else (where,)):
            names = take.names(keys)
            if names:
                parts[part] = names
                break
    return Reading(label, parts, reads, drops)


@LAYOUTS.register
class ReferenceCode:
    name, generic = "reference", False
    summary = ("the MCF reference code's training checkpoint: online_encoder.*, target_encoder.* (projectors as "
               ".fc), decoder_*, mask_token, predictor.*, perceptual_loss.model.* (the teacher)")

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        if "online_encoder.patch_embed.proj.weight" not in keys:
            return None
        return read_parts("reference-code MCF checkpoint", keys, {
            "online_encoder": Take("online_encoder.", skip=("fc.",), drop_head=True),
            "target_encoder": Take("target_encoder.", skip=("fc.",), drop_head=True),
            "projector": (Take("online_encoder.fc."), Take("projector.")),
            "target_projector": (Take("target_encoder.fc."), Take("target_projector.")),
            "predictor": Take("predictor."), "decoder": Take(match=DECODER_KEY),
            "teacher": Take("perceptual_loss.model.", drop_head=True)},
            ("online_encoder.", "target_encoder.", "projector.", "target_projector.", "predictor.",
             "perceptual_loss.model.", "decoder_", "mask_token"))


# Where each part sits in `MCFModel.state_dict()` (the frozen teacher is left out, as `convert` does).
MODEL_PREFIX = {"online_encoder": "encoder.", "target_encoder": "target_encoder.", "projector": "projector.",
                "target_projector": "target_projector.", "predictor": "predictor.", "decoder": ""}
TEACHER_PREFIX = "perceptual.teacher."


@LAYOUTS.register
class McfFastModel:
    name, generic = "mcf_fast", False
    summary = "an MCFModel state dict (`convert --out` files): encoder.*, target_encoder.*, projector.*, ..."

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        if "encoder.patch_embed.proj.weight" not in keys or not (
                "target_encoder.patch_embed.proj.weight" in keys or "decoder_embed.weight" in keys):
            return None
        wheres = {p: Take(pre) for p, pre in MODEL_PREFIX.items() if p != "decoder"}
        wheres.update(decoder=Take(match=DECODER_KEY), teacher=Take(TEACHER_PREFIX))
        reads = tuple(pre for p, pre in MODEL_PREFIX.items() if pre) + (TEACHER_PREFIX, "decoder_", "mask_token")
        return read_parts("mcf_fast model state dict", keys, wheres, reads)


@LAYOUTS.register
class MocoV3:
    name, generic = "moco_v3", False
    summary = "MoCo v3: {'state_dict': {module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}}"

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        if "base_encoder.patch_embed.proj.weight" not in keys:
            return None
        # MoCo v3's projector (3 layers, inside the encoders' head) and predictor (final BN) are not ours.
        return read_parts("MoCo v3 checkpoint", keys, {"online_encoder": Take("base_encoder.", drop_head=True),
                                                  "target_encoder": Take("momentum_encoder.", drop_head=True)},
                     ("base_encoder.", "momentum_encoder."), ("predictor.",))


_VIT_PREFIXES = ("", "encoder.", "model.", "backbone.", "base_encoder.")


def _vit_prefix(keys: set) -> str | None:
    """The wrapper prefix of a bare ViT's names ('' for none), or None when there is no ViT."""
    return next((p for p in _VIT_PREFIXES if p + "patch_embed.proj.weight" in keys), None)


def _vit_take(prefix: str) -> Take:
    return Take(prefix, drop_head=True, exclude=DECODER_KEY)


@LAYOUTS.register
class McfFastExport:
    name, generic = "export", True
    summary = "an mcf_fast export: encoder.safetensors in timm's names, with encoder.json beside it"

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        prefix = _vit_prefix(keys)
        if prefix is None or not (meta.get("format") == "mcf_fast.encoder.v1"
                                  or os.path.exists(_json_beside(meta.get("path", "")))):
            return None
        return read_parts("mcf_fast encoder export", keys, {"online_encoder": _vit_take(prefix)}, (prefix,))


@LAYOUTS.register
class MaePretraining:
    name, generic = "mae", True
    summary = "MAE pre-training: {'model': {patch_embed.*, blocks.*, decoder_*, mask_token}, 'args', ...}"

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        prefix = _vit_prefix(keys)
        if prefix is None or "decoder_embed.weight" not in keys:
            return None
        return read_parts("MAE pre-training checkpoint", keys,
                          {"online_encoder": _vit_take(prefix), "decoder": Take(match=DECODER_KEY)}, ("",))


@LAYOUTS.register
class VitStateDict:
    name, generic = "vit", True
    summary = "a ViT state dict (timm / MAE fine-tune / plain), optionally under encoder./model./backbone."

    @staticmethod
    def read(keys: set, meta: dict) -> Reading | None:
        prefix = _vit_prefix(keys)
        if prefix is None:
            return None
        where = f" under {prefix!r}" if prefix else ""
        return read_parts(f"ViT state dict{where} (timm / MAE / plain)", keys, {"online_encoder": _vit_take(prefix)},
                     (prefix,))


def read_names(keys, meta: dict) -> Reading:
    """The first layout that recognises these tensor names (specific ones before generic ones); raises
    listing the top-level prefixes found when none does."""
    keys = set(keys)
    for layout in sorted(LAYOUTS, key=lambda e: bool(getattr(e, "generic", False))):
        reading = layout.read(keys, meta)
        if reading is not None:
            return reading
    found = Counter(k.split(".")[0] for k in keys)
    raise ValueError(f"unknown checkpoint layout in {meta.get('path')!r}: found {dict(found.most_common(12))} "
                     "(top-level key prefixes: tensor counts); expected a ViT ('patch_embed.proj.weight', "
                     "optionally under encoder./model./module.base_encoder.), a reference-code MCF "
                     "checkpoint (online_encoder.*), an MAE or MoCo v3 checkpoint, or an mcf_fast export")


def recognise(sd: dict[str, torch.Tensor], meta: dict) -> tuple[str, dict[str, dict], tuple, tuple]:
    """(layout label, parts, prefixes it reads, prefixes it drops on purpose) of a flat state dict;
    raises listing what it found when no layout fits."""
    r = read_names(sd, meta)
    parts = {part: {n: sd[k] for n, k in names.items()} for part, names in r.parts.items()}
    return r.label, parts, r.reads, r.drops


def part_depth(keys, meta: dict, prefer: tuple[str, ...]) -> int | None:
    """Blocks of the first sub-network of `prefer` that a file's names hold (the one a loader would take),
    from the names alone; None when the names are of no known layout or hold no block."""
    try:
        r = read_names(keys, meta)
    except ValueError:
        return None
    part = next((p for p in prefer if p in r.parts), None)
    idx = [int(m.group(1)) for n in (r.parts.get(part) or {}) if (m := _BLOCK.match(n))]
    return 1 + max(idx) if idx else None


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def file_part_depth(path: str, prefer: tuple[str, ...]) -> int | None:
    """`part_depth` of a checkpoint file from its header alone (see `headers.checkpoint_keys`)."""
    keys = checkpoint_keys(path)
    return part_depth(unwrap_keys(keys), {"path": path}, prefer) if keys else None


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


__all__ = ["PARTS", "LAYOUTS", "Take", "Reading", "read_parts", "Checkpoint", "split_spec", "recognise", "read_names",
           "part_depth", "file_part_depth", "open_checkpoint", "vit_from", "load_vit", "arch_text", "to_model_state"]
