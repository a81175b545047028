"""The backbone for downstream runs: an exported encoder, or the same architecture from scratch.

`--encoder random` needs an architecture: a preset name (`vit-tiny`, `vit_small_patch16_224`, ...)
or an `encoder.json` (or the folder holding it), so a scratch baseline can copy the exact architecture
of the pre-trained encoder it is compared with.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from mcf_fast.model.vit import VisionTransformer, interpolate_pos_embed, load_encoder

from .identity import read_encoder_json

log = logging.getLogger(__name__)

ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_arch(spec: str) -> dict:
    """Architecture dict from a preset name or an encoder.json path (file or folder)."""
    path = os.path.join(spec, "encoder.json") if os.path.isdir(spec) else spec
    if path.endswith(".json") or os.path.exists(path):
        meta = read_encoder_json(path)
        missing = [k for k in ARCH_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{path} lacks architecture keys {missing}")
        return {k: meta[k] for k in ARCH_KEYS}
    m = re.fullmatch(r"vit[-_](tiny|small|base|large)(?:[-_]patch(\d+))?(?:[-_](\d+))?", spec.strip().lower())
    if not m:
        raise ValueError(f"unknown architecture {spec!r}: use vit-tiny|vit-small|vit-base|vit-large "
                         "(optionally _patchP_SIZE, e.g. vit_small_patch16_224) or a path to encoder.json")
    dim, depth, heads = PRESETS[m.group(1)]
    return dict(img_size=int(m.group(3) or 224), patch_size=int(m.group(2) or 16), in_chans=3,
                embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)


def resize_encoder(enc: VisionTransformer, img_size: int) -> VisionTransformer:
    """The same weights for another input size (position table resampled, as for any ViT fine-tune)."""
    if img_size == enc.arch["img_size"]:
        return enc
    p = enc.arch["patch_size"]
    if img_size % p:
        raise ValueError(f"--img-size {img_size} is not a multiple of the encoder's patch size {p}")
    new = VisionTransformer(**{**enc.arch, "img_size": img_size})
    sd = enc.state_dict()
    sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], img_size // p)
    new.load_state_dict(sd)
    return new


def _is_export(encoder: str) -> bool:
    """Our export (a folder, or encoder.safetensors with encoder.json beside it) vs any other checkpoint file."""
    if os.path.isdir(encoder):
        return True
    if not (encoder.endswith(".safetensors") and os.path.isfile(encoder)
            and os.path.exists(os.path.join(os.path.dirname(encoder) or ".", "encoder.json"))):
        return False
    from safetensors import safe_open
    with safe_open(encoder, "pt") as f:  # `convert --out model.safetensors` may sit beside an export
        return (f.metadata() or {}).get("format") != "mcf_fast.model.v1"


def _foreign_encoder(encoder: str, arch: str | None, img_size: int | None) -> tuple[VisionTransformer, dict]:
    """A reference-code, MAE, MoCo v3 or timm checkpoint (FILE, or FILE#target_encoder): the architecture is
    read off the weights; --arch (a preset or encoder.json) only supplies the head count, which they lack."""
    from mcf_fast.model.layouts import load_vit, split_spec
    if not os.path.isfile(split_spec(encoder)[0]):
        raise FileNotFoundError(f"--encoder {encoder} not found (give encoder.safetensors from a pre-training "
                                "run, its folder, a checkpoint file such as the reference code's "
                                "checkpoint-15.pth, or 'random')")
    heads = parse_arch(arch)["num_heads"] if arch else None
    enc, text, _ = load_vit(encoder, prefer=("online_encoder",), num_heads=heads)
    log.info("encoder: %s", text)
    native = enc.arch["img_size"]
    enc = resize_encoder(enc, img_size or native)
    return enc, {"source": os.path.abspath(split_spec(encoder)[0]), "description": text, "arch": dict(enc.arch),
                 "pretrain_img_size": native, "norm_mean": list(IMAGENET_MEAN), "norm_std": list(IMAGENET_STD)}


def build_encoder(encoder: str, arch: str | None, img_size: int | None, seed: int) -> tuple[VisionTransformer, dict]:
    """(encoder at `img_size`, info with source, arch, norm_mean, norm_std)."""
    if encoder == "random":
        if not arch:
            raise ValueError("--encoder random needs --arch (a preset such as vit-tiny, or the pre-trained "
                             "encoder.json so the baseline has the same architecture)")
        a = parse_arch(arch)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 7919)  # scratch weights depend on the seed only, not on earlier draws
        enc = VisionTransformer(**a)
        torch.random.set_rng_state(gen_state)
        mean, std, source = IMAGENET_MEAN, IMAGENET_STD, "random"
    elif not _is_export(encoder):
        return _foreign_encoder(encoder, arch, img_size)
    else:
        enc = load_encoder(encoder)
        js = os.path.join(encoder if os.path.isdir(encoder) else os.path.dirname(encoder) or ".", "encoder.json")
        meta = read_encoder_json(js)
        mean, std = meta.get("norm_mean", IMAGENET_MEAN), meta.get("norm_std", IMAGENET_STD)
        source = os.path.abspath(encoder)
        if arch and parse_arch(arch) != {k: enc.arch[k] for k in ARCH_KEYS}:
            log.warning("--arch %s differs from the architecture in %s; using the file's", arch, js)
    native = enc.arch["img_size"]
    enc = resize_encoder(enc, img_size or native)
    return enc, {"source": source, "arch": dict(enc.arch), "pretrain_img_size": native,
                 "norm_mean": list(mean), "norm_std": list(std)}


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's layer-wise LR decay: block i gets lr * decay^(depth - i); embeddings
    decay^(depth + 1); the head the full lr. No weight decay on biases, norms and tokens."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder."):
            sub = name[len("encoder."):]
            if sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            elif sub.startswith(("cls_token", "pos_embed", "patch_embed")):
                layer = 0
            else:
                layer = depth + 1
        else:
            layer = depth + 1
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        key = (layer, no_wd)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "lr_scale": scale, "lr": lr * scale,
                           "weight_decay": 0.0 if no_wd else weight_decay, "layer": layer}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
