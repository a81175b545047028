"""The frozen teacher whose feature maps judge the decoder's image (MCF's perceptual loss), and the kinds
of teacher `--model.teacher` picks from.

Kinds (entries of `TEACHERS`; `python -m mcf_fast.pretrain --help` lists them):
  checkpoint:PATH  a pre-trained ViT (MoCo v3 `module.base_encoder.*`, MAE `{'model': ...}`, timm or
                   plain state dicts, safetensors, our encoder.safetensors, the reference code's teacher
                   `perceptual_loss.model.*`; `PATH#PART` picks another sub-network, see `layouts`);
                   architecture read off it; non-float or non-finite weights are refused
  random           a frozen ViT with seeded random weights (no download needed: the demo's default)
  ema              the momentum (target) encoder itself
  pixel            no teacher: MAE's pixel loss on the removed patches (optionally per-patch normalised)

A kind is a class with `name`, `summary`, `fields` (the config fields it reads), `takes_path`,
`term` (the name of its loss term), `precheck(cfg)` (cheap, before anything is built or written),
`build(spec, model)` (the module `MCFModel.perceptual` holds, or None) and
`loss(model, imgs, pred, pred_patches, mask)`; `@TEACHERS.register` adds it everywhere at once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcf_fast.registry import Registry, choices

from .headers import check_input_file
from .layout_kinds import file_part_depth, file_part_width
from .layouts import load_vit, split_spec
from .vit import VisionTransformer, build_vit

log = logging.getLogger(__name__)

TEACHERS: Registry = Registry("teacher", "--model.teacher")

RESIZES = choices("teacher resize", "--model.teacher_resize", {
    "bilinear": "resize only when sizes differ",
    "nearest": "F.interpolate always, the reference code"})
RESIZE_MODES = RESIZES.names()


@dataclass(frozen=True)
class TeacherSpec:
    """What MCFModel hands a teacher kind's `build`: the spec's argument and every teacher setting."""
    kind: str
    arg: str  # PATH of 'checkpoint:PATH'; '' for kinds that take none
    arch: dict  # the 'random' teacher's ViT (img_size, patch_size, embed_dim, depth, num_heads)
    layers: tuple[int, ...]
    num_heads: int | None
    seed: int
    resize: str
    grad_ckpt: bool
    attention: str | None = None


def parse_teacher_spec(spec: str) -> tuple[str, str]:
    """'checkpoint:/p' -> ('checkpoint', '/p'); 'random' -> ('random', ''); unknown kinds list the choices."""
    kind, sep, arg = str(spec).partition(":")
    entry = TEACHERS.get(kind)
    if getattr(entry, "takes_path", False) and not arg:
        raise ValueError(f"--model.teacher {spec!r}: needs a path: --model.teacher {kind}:/path/to/vit_b.pth.tar")
    if not getattr(entry, "takes_path", False) and sep:
        raise ValueError(f"--model.teacher {spec!r}: '{kind}' takes no argument: use --model.teacher {kind} "
                         "(or checkpoint:PATH)")
    return kind, arg


def _bad(option: str, value, msg: str):
    raise ValueError(f"--{option} {value!r}: {msg}")


def _layers_text(layers) -> str:
    return ",".join(str(i) for i in layers)


def _check_layers(m, depth: int, where: str) -> None:
    if max(m.teacher_layers) >= depth:
        _bad("model.teacher_layers", _layers_text(m.teacher_layers),
             f"block {max(m.teacher_layers)} is beyond the {depth}-block teacher{where}; use indices 0..{depth - 1}")


class FeatureTeacher:
    """Kinds whose ViT features judge the image: the PerceptualLoss module, built and checked here."""
    term = "perceptual"
    takes_path = False

    @classmethod
    def teacher_vit(cls, spec: TeacherSpec) -> VisionTransformer | None:
        raise NotImplementedError  # None: the target encoder judges (passed at call time)

    @classmethod
    def build(cls, spec: TeacherSpec, model) -> "PerceptualLoss":
        vit = cls.teacher_vit(spec)
        if vit is not None:
            vit.requires_grad_(False).eval()
        judge = vit if vit is not None else model.target_encoder
        depth = len(judge.blocks)
        if max(spec.layers) >= depth or min(spec.layers) < 0:
            raise ValueError(f"teacher layers {list(spec.layers)} out of range for a {depth}-block teacher")
        # Recompute the teacher's blocks in backward: its activations for the predicted image are
        # the largest part of a step's memory (ViT-B at 224), for one more teacher forward.
        judge.grad_ckpt = spec.grad_ckpt
        return PerceptualLoss(vit, spec.layers, judge.patch_embed.img_size, spec.resize)

    @staticmethod
    def loss(model, imgs, pred, pred_patches, mask) -> torch.Tensor:
        return model.perceptual(pred, imgs, model._teacher_vit())


@TEACHERS.register
class CheckpointTeacher(FeatureTeacher):
    name, takes_path = "checkpoint", True
    summary = ("checkpoint:PATH, a pre-trained ViT file: MoCo v3, MAE, timm, safetensors, an mcf_fast export or the "
               "reference code's teacher, PATH#PART picking a sub-network; its architecture is read off the file")
    fields = ("model.teacher", "model.teacher_layers", "model.teacher_num_heads", "model.teacher_resize",
              "model.teacher_grad_ckpt")

    @staticmethod
    def precheck(cfg) -> None:
        m = cfg.model
        spec = parse_teacher_spec(m.teacher)[1]
        path, part = split_spec(spec)
        check_input_file("model.teacher", path, "a pre-trained ViT checkpoint (.pth, .pth.tar or .safetensors)")
        if os.path.isdir(path):
            path = os.path.join(path, "encoder.safetensors")
        prefer = (part,) if part else ("teacher", "online_encoder")
        depth = file_part_depth(path, prefer)
        if depth is not None:
            _check_layers(m, depth, f" in {spec!r}")
        width = file_part_width(path, prefer)  # heads are not in the weights; where the width is, they must divide it
        if width is not None and width % m.teacher_num_heads:
            _bad("model.teacher_num_heads", m.teacher_num_heads, f"must divide the width {width} of the teacher in "
                 f"{spec!r}")

    @classmethod
    def teacher_vit(cls, spec: TeacherSpec) -> VisionTransformer:
        try:  # a reference-code checkpoint holds its own teacher: take it before the online encoder
            vit, text, _ = load_vit(spec.arg, prefer=("teacher", "online_encoder"), num_heads=spec.num_heads,
                                    attention=spec.attention)
        except ValueError as e:  # named by the option; a refused file stays a RefusedFile (still a ValueError)
            from mcf_fast.pickle_bounds import RefusedFile
            kind = RefusedFile if isinstance(e, RefusedFile) else ValueError
            raise kind(f"--model.teacher checkpoint:{spec.arg}: {e}") from e
        log.info("teacher: %s", text)
        return vit


@TEACHERS.register
class RandomTeacher(FeatureTeacher):
    name = "random"
    summary = "a frozen ViT with seeded random weights, sized by --model.teacher_*; no download, the demo's default"
    fields = ("model.teacher_img_size", "model.teacher_patch_size", "model.teacher_embed_dim", "model.teacher_depth",
              "model.teacher_num_heads", "model.teacher_layers", "model.teacher_resize", "model.teacher_grad_ckpt")

    @staticmethod
    def precheck(cfg) -> None:
        m = cfg.model
        if m.teacher_img_size % m.teacher_patch_size:
            _bad("model.teacher_img_size", m.teacher_img_size,
                 f"must be a multiple of --model.teacher_patch_size {m.teacher_patch_size}")
        if m.teacher_embed_dim % m.teacher_num_heads:
            _bad("model.teacher_num_heads", m.teacher_num_heads,
                 f"must divide --model.teacher_embed_dim {m.teacher_embed_dim}")
        if m.teacher_embed_dim % 4:
            _bad("model.teacher_embed_dim", m.teacher_embed_dim, "must be divisible by 4 (2-D sin-cos position "
                 "embedding)")
        _check_layers(m, m.teacher_depth, f" (--model.teacher_depth {m.teacher_depth})")

    @classmethod
    def teacher_vit(cls, spec: TeacherSpec) -> VisionTransformer:
        with torch.random.fork_rng(devices=[]):  # its own seed: the model's init does not move
            torch.manual_seed(spec.seed)
            return build_vit(spec.arch, spec.attention, source="the random teacher (--model.teacher_*)")


@TEACHERS.register
class EmaTeacher(FeatureTeacher):
    name = "ema"
    summary = "the momentum encoder itself judges the image"
    fields = ("model.teacher_layers", "model.teacher_resize", "model.teacher_grad_ckpt")

    @staticmethod
    def precheck(cfg) -> None:
        _check_layers(cfg.model, cfg.model.depth, f" (the momentum encoder, --model.depth {cfg.model.depth})")

    @classmethod
    def teacher_vit(cls, spec: TeacherSpec) -> None:
        return None  # not registered twice: PerceptualLoss gets the target encoder at call time


@TEACHERS.register
class PixelTeacher:
    name, takes_path, term = "pixel", False, "pixel"
    summary = "no teacher: MAE's pixel loss on the removed patches, each normalised with --model.norm_pix_loss"
    fields = ("model.norm_pix_loss", "model.mask_ratio", "model.perceptual_weight")

    @staticmethod
    def precheck(cfg) -> None:
        m = cfg.model
        L = (m.img_size // m.patch_size) ** 2
        if int(L * (1 - m.mask_ratio)) >= L:
            _bad("model.mask_ratio", m.mask_ratio, "removes no patch, and the pixel teacher's loss is taken on "
                 "removed patches: use a ratio above 0 (0.75 in MAE)")

    @staticmethod
    def build(spec: TeacherSpec, model) -> None:
        return None

    @staticmethod
    def loss(model, imgs, pred, pred_patches, mask) -> torch.Tensor:
        return model.pixel_loss(imgs, pred_patches, mask)


def build_teacher_vit(spec: str, arch: dict, seed: int, num_heads: int | None = None,
                      attention: str | None = None) -> VisionTransformer:
    """A frozen ViT for a kind that has one ('checkpoint:PATH', 'random'): `arch` is used by 'random',
    the file's own architecture by 'checkpoint'."""
    kind, arg = parse_teacher_spec(spec)
    entry = TEACHERS.get(kind)
    make = getattr(entry, "teacher_vit", None)
    vit = make(TeacherSpec(kind, arg, arch, (0,), num_heads, seed, "bilinear", False, attention)) if make else None
    if vit is None:
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
        if resize not in RESIZES:
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


__all__ = ["TEACHERS", "TeacherSpec", "FeatureTeacher", "parse_teacher_spec", "build_teacher_vit", "PerceptualLoss", "RESIZES",
           "RESIZE_MODES"]
