"""The checkpoint layouts people actually have, each recognised from a file's tensor names alone.

Each layout is an entry of the `LAYOUTS` registry: a class with `name`, `summary`, `generic` and
`read(names, meta) -> Reading | None`, which recognises the file and says where each sub-network sits
(`Take`). Specific layouts are tried in registration order, then the `generic` ones (a bare ViT, which
many layouts also contain). Loading (`layouts.recognise`, `open_checkpoint`) and the header-only
pre-flight checks (`file_part_depth`, `file_part_width`: a teacher's depth and width before anything is
loaded) ask the same entries, so a new layout is one class and one `register` line.
  reference   the MCF reference code: online_encoder.*, target_encoder.* (projectors as .fc), decoder_*,
              mask_token, predictor.*, perceptual_loss.model.* (the teacher)
  mcf_fast    MCFModel state dicts (`convert --out` files): encoder.*, target_encoder.*, projector.*, ...
  moco_v3     base_encoder.*, momentum_encoder.* (MoCo's own projector and predictor left out)
  export      mcf_fast's encoder.safetensors (+ encoder.json beside it)         [generic]
  mae         MAE pre-training: patch_embed.*, blocks.*, decoder_*, mask_token   [generic]
  vit         a ViT state dict (timm / MAE fine-tune / plain), maybe under encoder./model./backbone. [generic]
Names are given after `checkpoints.unwrap_keys` (wrappers such as 'state_dict' and a DDP 'module.' gone).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from mcf_fast.registry import Registry

from .checkpoints import unwrap_keys
from .headers import checkpoint_keys, safetensors_shapes

_HEAD = re.compile(r"^(head|fc_norm|pre_logits|head_drop)(\.|$)")
DECODER_KEY = re.compile(r"^(decoder_|mask_token$)")


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


class MarkedLayout:
    """Specific layouts, recognised by one tensor name only they have (`marker`); `read_known` maps them."""
    generic = False
    marker = ""

    @classmethod
    def read(cls, keys: set, meta: dict) -> Reading | None:
        return cls.read_known(keys, meta) if cls.marker in keys else None


@LAYOUTS.register
class ReferenceCode(MarkedLayout):
    name, marker = "reference", "online_encoder.patch_embed.proj.weight"
    summary = ("the MCF reference code's training checkpoint: online_encoder.*, target_encoder.* (projectors as "
               ".fc), decoder_*, mask_token, predictor.*, perceptual_loss.model.* (the teacher)")

    @staticmethod
    def read_known(keys: set, meta: dict) -> Reading:
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
class McfFastModel(MarkedLayout):
    name, marker = "mcf_fast", "encoder.patch_embed.proj.weight"
    summary = "an MCFModel state dict (`convert --out` files): encoder.*, target_encoder.*, projector.*, ..."

    @staticmethod
    def read_known(keys: set, meta: dict) -> Reading | None:
        if "target_encoder.patch_embed.proj.weight" not in keys and "decoder_embed.weight" not in keys:
            return None  # an encoder alone under 'encoder.' is a wrapped ViT state dict
        wheres = {p: Take(pre) for p, pre in MODEL_PREFIX.items() if p != "decoder"}
        wheres.update(decoder=Take(match=DECODER_KEY), teacher=Take(TEACHER_PREFIX))
        reads = tuple(pre for p, pre in MODEL_PREFIX.items() if pre) + (TEACHER_PREFIX, "decoder_", "mask_token")
        return read_parts("mcf_fast model state dict", keys, wheres, reads)


@LAYOUTS.register
class MocoV3(MarkedLayout):
    name, marker = "moco_v3", "base_encoder.patch_embed.proj.weight"
    summary = "MoCo v3: {'state_dict': {module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}}"

    @staticmethod
    def read_known(keys: set, meta: dict) -> Reading:
        # MoCo v3's projector (3 layers, inside the encoders' head) and predictor (final BN) are not ours.
        return read_parts("MoCo v3 checkpoint", keys, {"online_encoder": Take("base_encoder.", drop_head=True),
                                                       "target_encoder": Take("momentum_encoder.", drop_head=True)},
                          ("base_encoder.", "momentum_encoder."), ("predictor.",))


_VIT_PREFIXES = ("", "encoder.", "model.", "backbone.", "base_encoder.")


def _vit_prefix(keys: set) -> str | None:
    """The wrapper prefix of a bare ViT's names ('' for none), or None when there is no ViT."""
    return next((p for p in _VIT_PREFIXES if p + "patch_embed.proj.weight" in keys), None)


class BareVitLayout:
    """Generic layouts whose encoder is a bare ViT (timm names, maybe under one wrapper prefix): `read`
    finds the prefix, `read_vit(keys, meta, prefix, encoder)` decides and maps the rest."""
    generic = True

    @classmethod
    def read(cls, keys: set, meta: dict) -> Reading | None:
        prefix = _vit_prefix(keys)
        if prefix is None:
            return None
        return cls.read_vit(keys, meta, prefix, Take(prefix, drop_head=True, exclude=DECODER_KEY))


@LAYOUTS.register
class McfFastExport(BareVitLayout):
    name = "export"
    summary = "an mcf_fast export: encoder.safetensors in timm's names, with encoder.json beside it"

    @staticmethod
    def read_vit(keys, meta, prefix, encoder) -> Reading | None:
        ours = meta.get("format") == "mcf_fast.encoder.v1" or os.path.exists(json_beside(meta.get("path", "")))
        return read_parts("mcf_fast encoder export", keys, {"online_encoder": encoder}, (prefix,)) if ours else None


@LAYOUTS.register
class MaePretraining(BareVitLayout):
    """A bare ViT with MAE's decoder beside it (decoder_embed.weight marks it)."""
    name, summary = "mae", "MAE pre-training: {'model': {patch_embed.*, blocks.*, decoder_*, mask_token}, 'args', ...}"

    @classmethod
    def read_vit(cls, keys, meta, prefix, encoder) -> Reading | None:
        parts = {"online_encoder": encoder, "decoder": Take(match=DECODER_KEY)}
        return read_parts("MAE pre-training checkpoint", keys, parts, ("",)) if "decoder_embed.weight" in keys else None


@LAYOUTS.register
class VitStateDict(BareVitLayout):
    name = "vit"
    summary = "a ViT state dict (timm / MAE fine-tune / plain), optionally under encoder./model./backbone."

    @staticmethod
    def read_vit(keys, meta, prefix, encoder) -> Reading:
        label = f"ViT state dict{f' under {prefix!r}' if prefix else ''} (timm / MAE / plain)"
        return read_parts(label, keys, {"online_encoder": encoder}, (prefix,))


def read_names(keys, meta: dict) -> Reading:
    """The first layout that recognises these tensor names (specific ones before generic ones); raises
    listing the top-level prefixes found when none does."""
    keys = dict.fromkeys(keys).keys()  # fast membership, and the file's own order (parts and messages keep it)
    for layout in sorted(LAYOUTS, key=lambda e: bool(getattr(e, "generic", False))):
        reading = layout.read(keys, meta)
        if reading is not None:
            return reading
    found = Counter(k.split(".")[0] for k in keys)
    raise ValueError(f"unknown checkpoint layout in {meta.get('path')!r}: found {dict(found.most_common(12))} "
                     "(top-level key prefixes: tensor counts); expected a ViT ('patch_embed.proj.weight', "
                     "optionally under encoder./model./module.base_encoder.), a reference-code MCF "
                     "checkpoint (online_encoder.*), an MAE or MoCo v3 checkpoint, or an mcf_fast export")



def part_names(keys, meta: dict, prefer: tuple[str, ...]) -> dict[str, str] | None:
    """{name in the sub-network: name in the file} of the first of `prefer` a file's names hold (the part a
    loader would take), from the names alone; None when they are of no known layout or hold none of them."""
    try:
        r = read_names(keys, meta)
    except ValueError:
        return None
    part = next((p for p in prefer if p in r.parts), None)
    return r.parts.get(part) if part else None


def part_depth(keys, meta: dict, prefer: tuple[str, ...]) -> int | None:
    """Blocks of that sub-network (see `part_names`); None when unknown or without blocks."""
    idx = [int(m.group(1)) for n in (part_names(keys, meta, prefer) or {}) if (m := _BLOCK.match(n))]
    return 1 + max(idx) if idx else None


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def file_part_depth(path: str, prefer: tuple[str, ...]) -> int | None:
    """`part_depth` of a checkpoint file from its header alone (see `headers.checkpoint_keys`)."""
    keys = checkpoint_keys(path)
    return part_depth(unwrap_keys(keys), {"path": path}, prefer) if keys else None


def file_part_width(path: str, prefer: tuple[str, ...]) -> int | None:
    """Width of that sub-network where the header holds shapes (a .safetensors file); None otherwise."""
    if not path.endswith(".safetensors"):
        return None
    shapes = safetensors_shapes(path)
    names = part_names(unwrap_keys(list(shapes)), {"path": path}, prefer) or {}
    name = names.get("patch_embed.proj.weight")
    shape = shapes.get(name, shapes.get(f"module.{name}")) if name else None
    return shape[0] if shape else None


def json_beside(path: str) -> str:
    if not path.endswith(".safetensors"):
        return ""
    return os.path.join(os.path.dirname(path) or ".", "encoder.json")



__all__ = ["LAYOUTS", "MarkedLayout", "BareVitLayout", "Take", "Reading", "read_parts", "read_names", "part_names",
           "part_depth", "file_part_depth", "file_part_width", "json_beside", "DECODER_KEY", "MODEL_PREFIX",
           "TEACHER_PREFIX"]
