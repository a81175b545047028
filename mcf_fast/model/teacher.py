"""The frozen teacher whose feature maps judge the decoder's image (MCF's perceptual loss).

Sources (`--model.teacher`):
  checkpoint:PATH  a pre-trained ViT (MoCo v3 `module.base_encoder.*`, MAE `{'model': ...}`, timm or
                   plain state dicts, safetensors, our encoder.safetensors, the reference code's teacher
                   `perceptual_loss.model.*`; `PATH#PART` picks another sub-network, see `layouts`);
                   architecture read off it; non-float or non-finite weights are refused
  random           a frozen ViT with seeded random weights (no download needed: the demo's default)
  ema              the momentum (target) encoder itself
  pixel            no teacher: MAE's pixel loss on the removed patches (optionally per-patch normalised)
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layouts import load_vit
from .vit import VisionTransformer

log = logging.getLogger(__name__)

RESIZE_MODES = ("bilinear", "nearest")


def parse_teacher_spec(spec: str) -> tuple[str, str]:
    """'checkpoint:/p' -> ('checkpoint', '/p'); 'random' -> ('random', '')."""
    kind, _, arg = spec.partition(":")
    if kind not in ("checkpoint", "random", "ema", "pixel"):
        raise ValueError(f"unknown teacher {spec!r}: use checkpoint:PATH, random, ema or pixel")
    if kind == "checkpoint" and not arg:
        raise ValueError("teacher 'checkpoint:' needs a path, e.g. checkpoint:/ckpt/vit-b-300ep.pth.tar")
    if kind != "checkpoint" and arg:
        raise ValueError(f"teacher {kind!r} takes no argument (got {spec!r})")
    return kind, arg


def build_teacher_vit(spec: str, arch: dict, seed: int, num_heads: int | None = None) -> VisionTransformer:
    """A frozen ViT for 'checkpoint:PATH' or 'random' (`arch` used for random; read off the file otherwise)."""
    kind, path = parse_teacher_spec(spec)
    if kind == "checkpoint":
        # A reference-code checkpoint holds its own teacher: take it before the online encoder.
        vit, text, _ = load_vit(path, prefer=("teacher", "online_encoder"), num_heads=num_heads)
        log.info("teacher: %s", text)
    elif kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = VisionTransformer(**arch)
    else:
        raise ValueError(f"teacher {kind!r} is not a standalone ViT")
    vit.requires_grad_(False)
    return vit.eval()


class PerceptualLoss(nn.Module):
    """Sum over levels of MSE between token-axis-L2-normalised teacher features of pred and real.

    The teacher never changes: its parameters have requires_grad=False, so the pred pass computes
    input gradients only, and the real pass runs without any graph.
    """

    def __init__(self, teacher: nn.Module | None, layers: Sequence[int], img_size: int, resize: str = "bilinear"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"teacher resize must be one of {RESIZE_MODES}, got {resize!r}")
        # 'bilinear': resize only when sizes differ (ours); 'nearest': F.interpolate(size) always, the
        # reference code's call (docs/METHOD.md §11) -- an identity when the sizes already match.
        self.resize = resize
        # `teacher` is None for the 'ema' source: the caller passes the encoder at call time, so the
        # momentum encoder is not registered (and sharded, and saved) twice.
        self.teacher = teacher
        self.layers = tuple(layers)
        self.img_size = img_size

    def train(self, mode: bool = True):  # the teacher stays in eval mode whatever the model does
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _prep(self, x: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
        size = vit.patch_embed.img_size
        if self.resize == "nearest":
            return F.interpolate(x, size=(size, size), mode="nearest")
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor, vit: VisionTransformer) -> list[torch.Tensor]:
        feats = vit.forward_intermediates(self._prep(x, vit), self.layers)
        return [F.normalize(f.float(), dim=1) for f in feats]  # L2 along the token axis (docs/METHOD.md §5)

    def forward(self, pred: torch.Tensor, real: torch.Tensor, vit: VisionTransformer | None = None):
        vit = vit if vit is not None else self.teacher
        with torch.no_grad():
            target = self.features(real, vit)
        out = self.features(pred, vit)
        return sum(F.mse_loss(o, t) for o, t in zip(out, target))


__all__ = ["parse_teacher_spec", "build_teacher_vit", "PerceptualLoss", "RESIZE_MODES"]
