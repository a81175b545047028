"""A plain ViT with timm's parameter names, so MAE / timm / MoCo v3 checkpoints load without renaming.

Attention goes through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
fused CPU kernel on CPU); xformers is an opt-in backend for CUDA tensors (`set_attention_backend`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

_ATTN_BACKEND = os.environ.get("MCF_FAST_ATTENTION", "sdpa")


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: 'sdpa' (default, every device) or 'xformers' (CUDA only)."""
    global _ATTN_BACKEND
    if name not in ("sdpa", "xformers"):
        raise ValueError(f"attention backend must be 'sdpa' or 'xformers', got {name!r}")
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise RuntimeError("attention backend 'xformers' requested but xformers is not importable "
                               f"({e}); install the [xformers] extra or use 'sdpa'") from e
    _ATTN_BACKEND = name


def _xformers_attention(q, k, v):
    import xformers.ops as xops
    # xformers wants [B, T, H, Dh]; it has no CPU kernels, so only CUDA tensors get here.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


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
    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if _ATTN_BACKEND == "xformers" and x.is_cuda:
            x = _xformers_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
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
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
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
                 mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer-like parameter with requires_grad=False: timm and MAE store it as a parameter,
        # so checkpoints carry it under the same name.
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.patch_embed.grid_size)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
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


def save_encoder(encoder: VisionTransformer, out_dir: str, extra: dict | None = None) -> tuple[str, str]:
    """Write encoder.safetensors (timm keys, encoder only) and encoder.json; atomic renames."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in encoder.state_dict().items()}
    st, js = os.path.join(out_dir, "encoder.safetensors"), os.path.join(out_dir, "encoder.json")
    meta = {"format": ENCODER_FORMAT, **encoder.arch, "timm_name": timm_name(encoder.arch),
            "norm_mean": [0.485, 0.456, 0.406], "norm_std": [0.229, 0.224, 0.225], **(extra or {})}
    with open(js + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    save_file(sd, st + ".tmp", metadata={"format": ENCODER_FORMAT})
    # safetensors writes its file 0600; give it the mode every other file of the folder gets (the umask's)
    os.chmod(st + ".tmp", os.stat(js + ".tmp").st_mode & 0o777)
    os.replace(st + ".tmp", st)
    os.replace(js + ".tmp", js)
    return st, js


def load_encoder(path: str) -> VisionTransformer:
    """Read an exported encoder (encoder.safetensors beside encoder.json, or the folder holding them)."""
    from mcf_fast.safe_load import load_safetensors
    if os.path.isdir(path):
        path = os.path.join(path, "encoder.safetensors")
    js = os.path.join(os.path.dirname(path) or ".", "encoder.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder weights not found: {path} (expected encoder.safetensors from a "
                                "pre-training run's folder)")
    if not os.path.exists(js):
        raise FileNotFoundError(f"{js} not found: encoder.json (the architecture) must sit beside {path}")
    with open(js) as f:
        meta = json.load(f)
    if meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{js}: format {meta.get('format')!r} is not {ENCODER_FORMAT!r}")
    arch = {k: meta[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                 "mlp_ratio", "qkv_bias")}
    model = VisionTransformer(**arch)
    sd, _ = load_safetensors(path)  # a garbled or pickled file is one RefusedFile (ValueError) line
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the architecture in {js}: missing {missing}, unexpected {unexpected}")
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
