"""A plain ViT with timm's parameter names, so MAE / timm / MoCo v3 checkpoints load without renaming.

Attention is a constructor argument (`attention='sdpa' | 'xformers'`, see `attention.py`), so two
models in one process can use different kernels. `build_vit(arch, attention)` is the one place that
turns an architecture dict into a `VisionTransformer` (pre-training, teachers, eval, checkpoints).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .attention import resolve as resolve_attention

log = logging.getLogger(__name__)

# The architecture of a VisionTransformer, as encoder.json and `VisionTransformer.arch` spell it.
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


# ------------------------------------------------------------------ fixed 2-D sin-cos position embedding
def sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, [1 + grid^2, D] with a zero CLS row (or [grid^2, D])."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh = torch.arange(grid_size, dtype=torch.float64)
    gw = torch.arange(grid_size, dtype=torch.float64)
    # MAE's meshgrid(w, h) order: the first half of the channels encodes the column (w) index.
    ww, hh = torch.meshgrid(gw, gh, indexing="xy")

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([one_axis(embed_dim // 2, ww), one_axis(embed_dim // 2, hh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# ------------------------------------------------------------------ layers
def conv_patches(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, C*p*p] in the conv weight's (channel, row, col) order."""
    N, C, H, W = imgs.shape
    x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(N, (H // p) * (W // p), C * p * p)


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed already-extracted pixel patches [N, K, C*p*p] (channel-major, as the conv sees them)."""
        w = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches, w, self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, attention: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # the backend is this layer's own (None: the process default, read once at import)
        self.attention, self._attend = resolve_attention(attention)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, attention: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grad_ckpt: bool = False,
               collect: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks in order; optionally recompute activations in backward; return outputs at `collect`."""
    feats = []
    want = set(collect)
    for i, blk in enumerate(blocks):
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in want:
            feats.append(x)
    return x, feats


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT encoder (no head) with timm names; fixed sin-cos `pos_embed` [1, 1 + L, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, attention: str | None = None):
        super().__init__()
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.attention = resolve_attention(attention)[0]  # not part of `arch`: the weights do not depend on it
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer-like parameter with requires_grad=False: timm and MAE store it as a parameter,
        # so checkpoints carry it under the same name.
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.patch_embed.grid_size)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, self.attention)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_ckpt = False
        self.reset_parameters()

    def reset_parameters(self):
        init_vit_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: treat the conv like a linear
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.patch_embed.grid_size)[None])

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_full(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens with CLS: [N, 1 + L, D]."""
        t = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1)

    def embed_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mode: str = "gather_pixels") -> torch.Tensor:
        """The visible patches `ids_keep` [N, K] of `imgs` embedded with their positions, CLS (plus its
        position) first: [N, 1 + K, D]. 'gather_pixels' gathers the K pixel patches and embeds only
        those (75% less embedding work at ratio 0.75); 'embed_all' embeds all L, then gathers (MAE's
        order). Both equal `embed_full(imgs)` at 0 and 1 + ids_keep."""
        pos = self.pos_embed[0]
        if mode == "gather_pixels":
            patches = ops.gather_visible(conv_patches(imgs, self.patch_embed.patch_size), ids_keep)
            x = self.patch_embed.forward_patches(patches) + pos[1:][ids_keep]
            cls = (self.cls_token + pos[:1]).expand(x.shape[0], -1, -1).to(x.dtype)
            return torch.cat([cls, x], 1)
        if mode == "embed_all":
            return ops.gather_visible(self.patch_embed(imgs), ids_keep, pos=pos, cls=self.cls_token)
        raise ValueError(f"embed mode must be 'gather_pixels' or 'embed_all', got {mode!r}")

    def forward_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mode: str = "gather_pixels") -> torch.Tensor:
        """The encoder on the visible patches only (MAE's encoder): embed_visible, blocks, norm -> [N, 1 + K, D]."""
        x, _ = run_blocks(self.blocks, self.embed_visible(imgs, ids_keep, mode), self.grad_ckpt)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = run_blocks(self.blocks, self.embed_full(x), self.grad_ckpt)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Token sequences [N, 1 + L, D] after the given blocks (0-based); stops after the last one."""
        last = max(indices)
        if last >= len(self.blocks) or min(indices) < 0:
            raise ValueError(f"block indices {list(indices)} out of range for depth {len(self.blocks)}")
        _, feats = run_blocks(self.blocks[: last + 1], self.embed_full(x), self.grad_ckpt, indices)
        return feats

    def forward(self, x):
        return self.forward_features(x)[:, 0]


def _arch_defaults() -> dict:
    sig = inspect.signature(VisionTransformer.__init__)
    return {k: sig.parameters[k].default for k in ARCH_KEYS}


def check_arch(arch: dict, source: str = "architecture") -> dict:
    """`arch` completed with VisionTransformer's defaults, every value checked: one-line ValueError naming
    `source` (a file, an option) and the key. Runs before any tensor is allocated."""
    if not isinstance(arch, dict):
        raise ValueError(f"{source}: the architecture must be a mapping of {', '.join(ARCH_KEYS)}")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown architecture key(s) {unknown}; the keys are {', '.join(ARCH_KEYS)}")
    a = {**_arch_defaults(), **arch}

    def bad(key, msg):
        raise ValueError(f"{source}: {key} {a[key]!r} {msg}")
    for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 1:
            bad(k, "must be a positive integer")
    r = a["mlp_ratio"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        bad("mlp_ratio", "must be a finite number > 0")
    if not isinstance(a["qkv_bias"], bool):
        bad("qkv_bias", "must be true or false")
    if a["img_size"] % a["patch_size"]:
        bad("img_size", f"is not a multiple of patch_size {a['patch_size']}")
    if a["embed_dim"] % a["num_heads"]:
        bad("num_heads", f"does not divide embed_dim {a['embed_dim']}")
    if a["embed_dim"] % 4:
        bad("embed_dim", "must be divisible by 4 (2-D sin-cos position embedding)")
    return a


def build_vit(arch: dict, attention: str | None = None, source: str = "architecture") -> VisionTransformer:
    """The one place an architecture dict (+ attention backend) becomes a VisionTransformer: pre-training's
    encoders, random teachers, checkpoints read by `layouts`, exports read back, eval's encoders."""
    return VisionTransformer(**check_arch(arch, source), attention=attention)


# ------------------------------------------------------------------ export / import as timm safetensors
ENCODER_FORMAT = "mcf_fast.encoder.v1"


def timm_name(arch: dict) -> str | None:
    """The timm model name for this architecture, where timm has one."""
    names = {(384, 12, 6): "vit_small", (768, 12, 12): "vit_base", (1024, 24, 16): "vit_large",
             (192, 12, 3): "vit_tiny"}
    base = names.get((arch["embed_dim"], arch["depth"], arch["num_heads"]))
    if base is None or arch["mlp_ratio"] != 4.0:
        return None
    return f"{base}_patch{arch['patch_size']}_{arch['img_size']}"


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _norm(name: str, values) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals) or (name == "std" and min(vals) <= 0):
        raise ValueError(f"encoder normalisation {name} must be 3 finite numbers{' > 0' if name == 'std' else ''}, "
                         f"got {values!r}")
    return vals


def save_encoder(encoder: VisionTransformer, out_dir: str, extra: dict | None = None, *,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[str, str]:
    """Write encoder.safetensors (timm keys, encoder only) and encoder.json; atomic renames.
    `mean`/`std`: the per-channel normalisation the encoder was trained with (a run's --data.mean/std),
    recorded as norm_mean/norm_std so evaluation feeds it images normalised the same way."""
    from safetensors.torch import save_file
    norm = {"norm_mean": _norm("mean", mean), "norm_std": _norm("std", std)}
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in encoder.state_dict().items()}
    st, js = os.path.join(out_dir, "encoder.safetensors"), os.path.join(out_dir, "encoder.json")
    meta = {"format": ENCODER_FORMAT, **encoder.arch, "timm_name": timm_name(encoder.arch), **norm,
            **(extra or {})}
    with open(js + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    save_file(sd, st + ".tmp", metadata={"format": ENCODER_FORMAT})
    # safetensors writes its file 0600; give it the mode every other file of the folder gets (the umask's)
    os.chmod(st + ".tmp", os.stat(js + ".tmp").st_mode & 0o777)
    os.replace(st + ".tmp", st)
    os.replace(js + ".tmp", js)
    return st, js


def export_paths(path: str) -> tuple[str, str]:
    """(encoder.safetensors, encoder.json) of an export given as the weights file or the folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "encoder.safetensors")
    js = os.path.join(os.path.dirname(path) or ".", "encoder.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder weights not found: {path} (expected encoder.safetensors from a "
                                "pre-training run's folder)")
    if not os.path.exists(js):
        raise FileNotFoundError(f"{js} not found: encoder.json (the architecture) must sit beside {path}")
    return path, js


def export_arch(path: str) -> tuple[dict, dict]:
    """(architecture, encoder.json contents) of an export, the architecture checked against the weights'
    safetensors header (depth, width, patch, input size, channels, MLP width, qkv bias) before any model
    is built: a wrong or hostile encoder.json costs a header read."""
    from .checkpoints import infer_vit_arch
    from .headers import read_small_json, safetensors_shapes
    path, js = export_paths(path)
    meta = read_small_json(js, "encoder.json")
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{js}: format {got!r} is not {ENCODER_FORMAT!r}")
    missing = [k for k in ARCH_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{js} lacks architecture keys {missing}")
    arch = check_arch({k: meta[k] for k in ARCH_KEYS}, js)
    try:
        shapes = safetensors_shapes(path)
        have = infer_vit_arch(shapes, arch["num_heads"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if "pos_embed" not in shapes:  # the input size is not in the weights then
        have["img_size"] = arch["img_size"]
    diff = [f"{k} {arch[k]!r} in encoder.json, {have[k]!r} in the weights" for k in ARCH_KEYS
            if k != "mlp_ratio" and arch[k] != have[k]]
    hidden = shapes["blocks.0.mlp.fc1.weight"][0]
    if int(arch["embed_dim"] * arch["mlp_ratio"]) != hidden:  # Mlp's width is int(dim * ratio)
        diff.append(f"mlp_ratio {arch['mlp_ratio']!r} in encoder.json, MLP width {hidden} in the weights")
    if diff:
        raise ValueError(f"{js} does not describe {path}: {'; '.join(diff)}")
    return arch, meta


def load_encoder(path: str, attention: str | None = None) -> VisionTransformer:
    """Read an exported encoder (encoder.safetensors beside encoder.json, or the folder holding them);
    encoder.json is checked against the weights' header before the model is built."""
    from mcf_fast.safe_load import load_safetensors

    from .checkpoints import check_fit
    arch, _ = export_arch(path)
    path, js = export_paths(path)
    model = build_vit(arch, attention, source=js)
    sd, _ = load_safetensors(path)  # a garbled or pickled file is one RefusedFile (ValueError) line
    check_fit(model.state_dict(), sd, f"{path} (architecture from {js})")
    model.load_state_dict(sd)
    return model


def interpolate_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a [1, 1 + g*g, D] table to a new grid (CLS row kept), for other input sizes."""
    cls, grid = pos[:, :1], pos[:, 1:]
    g = int(math.isqrt(grid.shape[1]))
    if g * g != grid.shape[1]:
        raise ValueError(f"position table of {grid.shape[1]} patches is not a square grid")
    if g == new_grid:
        return pos
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos.dtype)], 1)
