"""The MCF model: online MAE encoder on visible tokens, MAE decoder judged by a frozen teacher,
EMA target encoder + projector, predictor, and the two losses (docs/METHOD.md §2-§7).

Parameter names: the online encoder is `encoder.*` (timm names below it); the decoder keeps MAE's
top-level names (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N`,
`decoder_norm`, `decoder_pred`) so an MAE checkpoint's decoder loads without renaming.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import ops
from .heads import init_heads_, predictor, projector
from .teacher import PerceptualLoss, build_teacher_vit, parse_teacher_spec
from .terms import ForwardState, NamedTerms, default_terms, weighted_sum
from .vit import Block, VisionTransformer, init_vit_weights, run_blocks, sincos_pos_embed


@dataclass
class MCFOutput(NamedTerms):
    """One forward's result: the loss to back-propagate and its named parts."""
    loss: torch.Tensor  # sum over terms of weights[name] * terms[name], with its graph
    terms: dict[str, torch.Tensor]  # each term's value (0-dim float32, detached), in `model.loss_terms` order
    weights: dict[str, float]  # each term's weight
    pred: torch.Tensor  # decoder image [N, 3, H, W] (normalised space); detached on demand by callers


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, L, p*p*3] in MAE's (row, col, channel) order inside each patch."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, C: int = 3) -> torch.Tensor:
    """Inverse of `patchify`."""
    N, L, _ = x.shape
    h = int(L ** 0.5)
    x = x.reshape(N, h, h, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, h * p, h * p)


def _init_patch_bias_(vit: VisionTransformer, mode: str) -> None:
    """'zeros' (ours, MAE's linear-style init) or 'conv_default': Conv2d's own uniform(+-1/sqrt(fan_in)) bias,
    which the reference code keeps (its weight init never touches the conv bias)."""
    if mode not in ("zeros", "conv_default"):
        raise ValueError(f"patch_embed_bias must be 'zeros' or 'conv_default', got {mode!r}")
    if mode == "conv_default":
        w = vit.patch_embed.proj.weight
        bound = 1.0 / (w[0].numel() ** 0.5)
        nn.init.uniform_(vit.patch_embed.proj.bias, -bound, bound)


class MCFModel(nn.Module):
    def __init__(self, *, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, proj_hidden=4096, proj_dim=256,
                 teacher="random", teacher_arch: dict | None = None, teacher_layers=(2, 5, 8, 11),
                 teacher_num_heads: int | None = None, teacher_seed=0, norm_pix_loss=False,
                 temperature=0.2, perceptual_weight=1000.0, contrastive_weight=1.0,
                 embed_mode="gather_pixels", grad_ckpt=False, teacher_grad_ckpt=False,
                 head_init="torch", patch_embed_bias="zeros", teacher_resize="bilinear"):
        super().__init__()
        if embed_mode not in ("gather_pixels", "embed_all"):
            raise ValueError(f"embed_mode must be 'gather_pixels' or 'embed_all', got {embed_mode!r}")
        self.patch_size, self.img_size = patch_size, img_size
        self.temperature, self.embed_mode = temperature, embed_mode
        self.perceptual_weight, self.contrastive_weight = perceptual_weight, contrastive_weight
        self.norm_pix_loss = norm_pix_loss
        self.encoder = VisionTransformer(img_size, patch_size, 3, embed_dim, depth, num_heads, mlp_ratio)
        self.encoder.grad_ckpt = grad_ckpt
        _init_patch_bias_(self.encoder, patch_embed_bias)
        L = self.encoder.num_patches
        # ---- decoder (MAE names)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_embed_dim, int(L ** 0.5))[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        init_vit_weights(nn.ModuleList([self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                                        self.decoder_pred]))
        nn.init.normal_(self.mask_token, std=0.02)
        self.grad_ckpt = grad_ckpt
        # ---- contrastive branch (MoCo v3)
        self.projector = projector(embed_dim, proj_hidden, proj_dim)
        self.predictor = predictor(proj_dim, proj_hidden)
        init_heads_(self.projector, head_init)  # before the target copy, so both start equal
        init_heads_(self.predictor, head_init)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # ---- teacher
        self.teacher_kind, _ = parse_teacher_spec(teacher)
        self.perceptual = None
        if self.teacher_kind in ("checkpoint", "random"):
            arch = teacher_arch or dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
            vit = build_teacher_vit(teacher, arch, teacher_seed, teacher_num_heads)
            self.perceptual = PerceptualLoss(vit, teacher_layers, vit.patch_embed.img_size, teacher_resize)
        elif self.teacher_kind == "ema":
            self.perceptual = PerceptualLoss(None, teacher_layers, img_size, teacher_resize)
        if self.perceptual is not None:
            # Recompute the teacher's blocks in backward: its activations for the predicted image are
            # the largest part of a step's memory (ViT-B at 224), for one more teacher forward.
            self._teacher_vit().grad_ckpt = teacher_grad_ckpt
            depth_t = len(self._teacher_vit().blocks)
            if max(teacher_layers) >= depth_t or min(teacher_layers) < 0:
                raise ValueError(f"teacher layers {list(teacher_layers)} out of range for a {depth_t}-block teacher")
        # name -> LossTerm: what forward computes and sums (model/terms.py); weight-0 terms are left out
        self.loss_terms = default_terms(self)

    # ------------------------------------------------------------------ helpers
    def _teacher_vit(self) -> VisionTransformer:
        return self.perceptual.teacher if self.perceptual.teacher is not None else self.target_encoder

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target params, online params) in matching order, for the EMA update."""
        t = list(self.target_encoder.parameters()) + list(self.target_projector.parameters())
        o = list(self.encoder.parameters()) + list(self.projector.parameters())
        return t, o

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder, self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred,
                self.projector, self.predictor]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.train(mode)
        return self

    # ------------------------------------------------------------------ encoder on visible tokens
    def encode(self, vit: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """`vit` (the online or the target encoder) on the visible patches `ids_keep`: [N, 1+K, D]."""
        return vit.forward_visible(imgs, ids_keep, self.embed_mode)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """MAE decoder: embed, mask tokens + un-shuffle + position (one fused op), blocks -> [N, L, p*p*3]."""
        x = self.decoder_embed(latent)
        x = ops.scatter_to_full(x, ids_restore, self.mask_token, pos=self.decoder_pos_embed[0])
        x, _ = run_blocks(self.decoder_blocks, x, self.grad_ckpt)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The decoder's image [N, 3, H, W] (float32) from the visible patches `ids_keep`: the online encoder
        and the decoder only (no heads, so BatchNorm statistics and the EMA are untouched). Under FSDP2 it
        is a registered forward method, so a sharded model runs it on every rank together."""
        return unpatchify(self.decode(self.encode(self.encoder, imgs, ids_keep), ids_restore).float(),
                          self.patch_size)

    # ------------------------------------------------------------------ losses
    def pixel_loss(self, imgs, pred_patches, mask):
        target = patchify(imgs, self.patch_size).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred_patches.float() - target) ** 2).mean(-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum()

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                mask: torch.Tensor, ids_keep_target: torch.Tensor, rank: int = 0,
                local_negatives: bool = False) -> MCFOutput:
        """One MCF step's losses. ids_* for the online view [N, K] / [N, L]; mask [N, L] bool (True=removed);
        ids_keep_target [N, K] for the target view. The EMA update happens before this call.
        The encoder and decoder run once; then each of `self.loss_terms` in order (model/terms.py)."""
        latent = self.encode(self.encoder, imgs, ids_keep)
        pred_patches = self.decode(latent, ids_restore)
        pred = unpatchify(pred_patches, self.patch_size)
        state = ForwardState(imgs, ids_keep, ids_restore, mask, ids_keep_target, rank, local_negatives, latent,
                             pred_patches, pred)
        values = {name: term.compute(self, state) for name, term in self.loss_terms.items()}
        weights = {name: term.weight for name, term in self.loss_terms.items()}
        loss = weighted_sum(values, weights)
        return MCFOutput(loss, {name: v.detach() for name, v in values.items()}, weights, pred)


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """theta_t = m * theta_t + (1 - m) * theta_o, as two foreach kernels over all tensors."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, [o.detach().to(t.dtype) for t, o in zip(target, online)], alpha=1.0 - momentum)
