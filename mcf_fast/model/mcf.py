"""The MCF model: online MAE encoder on visible tokens, MAE decoder judged by a frozen teacher,
EMA target encoder + projector, predictor, and the two losses (docs/METHOD.md §2-§7).

Parameter names: the online encoder is `encoder.*` (timm names below it); the decoder keeps MAE's
top-level names (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N`,
`decoder_norm`, `decoder_pred`) so an MAE checkpoint's decoder loads without renaming.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from mcf_fast.registry import choices

from . import ops
from .heads import init_heads_, predictor, projector
from .teacher import TEACHERS, TeacherSpec, parse_teacher_spec
from .terms import ForwardState, NamedTerms, default_terms, weighted_sum
from .vit import ARCH_KEYS, Block, VisionTransformer, build_vit, init_vit_weights, run_blocks, sincos_pos_embed

log = logging.getLogger("mcf_fast")

EMBED_MODES = choices("embed mode", "--model.embed_mode", {
    "gather_pixels": "embed only the visible patches: 75% less embedding work",
    "embed_all": "embed all, then gather: MAE's order"})
PATCH_EMBED_BIASES = choices("patch-embedding bias init", "--model.patch_embed_bias", {
    "zeros": "zeros",
    "conv_default": "Conv2d's uniform, the reference code"})
# When `ema_update` runs (train/step.py calls it): its cadence, declared beside the update itself.
EMA_CADENCES = choices("EMA cadence", "--optim.ema_update", {
    "micro": "before every micro-step's forward, as the reference and the paper's numbers",
    "step": "once per optimizer step"})


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
    PATCH_EMBED_BIASES.get(mode)
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
                 head_init="torch", patch_embed_bias="zeros", teacher_resize="bilinear",
                 attention: str | None = None):
        super().__init__()
        EMBED_MODES.get(embed_mode)
        self.patch_size, self.img_size = patch_size, img_size
        self.temperature, self.embed_mode = temperature, embed_mode
        self.perceptual_weight, self.contrastive_weight = perceptual_weight, contrastive_weight
        self.norm_pix_loss = norm_pix_loss
        self.encoder = build_vit(dict(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim,
                                      depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio), attention)
        self.encoder.grad_ckpt = grad_ckpt
        _init_patch_bias_(self.encoder, patch_embed_bias)
        L = self.encoder.num_patches
        # ---- decoder (MAE names)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_embed_dim, int(L ** 0.5))[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attention=self.encoder.attention)
             for _ in range(decoder_depth)])
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
        # ---- teacher: its kind (model/teacher.py, TEACHERS) builds what judges the image, and its loss
        self.teacher_kind, arg = parse_teacher_spec(teacher)
        self.teacher_entry = TEACHERS.get(self.teacher_kind)
        arch = teacher_arch or dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
        spec = TeacherSpec(self.teacher_kind, arg, arch, tuple(int(i) for i in teacher_layers), teacher_num_heads,
                           teacher_seed, teacher_resize, teacher_grad_ckpt, self.encoder.attention)
        self.perceptual = self.teacher_entry.build(spec, self)
        # name -> LossTerm: what forward computes and sums (model/terms.py); weight-0 terms are left out
        self.loss_terms = default_terms(self)

    @classmethod
    def from_config(cls, m, *, seed: int = 0) -> "MCFModel":
        """The model a `ModelConfig` (train/config.py) describes, initialised from `seed` (a random teacher
        from seed + 1), then `decoder_init`, `init` and `compile` applied. Every config field named like a
        keyword of this class reaches it as is; the random teacher's ViT comes from the `teacher_*` fields."""
        params = inspect.signature(cls.__init__).parameters
        kw = {n: getattr(m, n) for n in params if n != "self" and hasattr(m, n)}
        kw["teacher_arch"] = {k: getattr(m, "teacher_" + k) for k in ARCH_KEYS if hasattr(m, "teacher_" + k)}
        torch.manual_seed(seed)
        model = cls(**kw, teacher_seed=seed + 1)
        if m.decoder_init:
            from .checkpoints import load_mae_decoder
            try:
                keys = load_mae_decoder(model, m.decoder_init, m.decoder_init_blocks)
            except ValueError as e:
                raise ValueError(f"--model.decoder_init {m.decoder_init}: {e}") from e
            log.info("decoder initialised from %s (%d tensors)", m.decoder_init, len(keys))
        if m.init:
            from .init_from import init_from_checkpoint
            for line in init_from_checkpoint(model, m.init):
                log.info("init: %s", line)
        if m.compile:
            for blk in list(model.encoder.blocks) + list(model.decoder_blocks) + list(model.target_encoder.blocks):
                blk.compile()
        return model

    # ------------------------------------------------------------------ helpers
    def teacher_loss(self, imgs, pred, pred_patches, mask) -> torch.Tensor:
        """The teacher kind's loss on the decoder's output: features of a frozen ViT, or pixels."""
        return self.teacher_entry.loss(self, imgs, pred, pred_patches, mask)

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
