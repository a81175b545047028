"""A plain re-statement of docs/METHOD.md §2-§7, formulated as the public reference code computes it.

This is the spec the engine is tested against and the baseline `benchmarks/run.py` times. It shares
the engine's parameters (it takes an `MCFModel`) but none of its shortcuts:
- masks from `noise` with two argsorts and gathers with an index expanded to [N, K, D];
- patch embedding of all L patches, then 75% thrown away;
- decoder un-shuffle as cat + expanded gather + cat + position add;
- the teacher's real-image pass under autograd, then detached;
- the EMA as a Python loop over parameters;
- the contrastive logits materialised in full [N, N * world] fp32.
Attention is the model's own (fused SDPA), as today's timm Block gives a user of the reference code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import all_gather_nograd
from .mcf import MCFModel, patchify, unpatchify
from .vit import VisionTransformer


def mae_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """MAE's per-sample random masking from `noise` [N, L]: (x_masked, mask float 0/1, ids_restore)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore


def noise_for(ids_keep: torch.Tensor, L: int) -> torch.Tensor:
    """Noise whose argsort puts `ids_keep` first (in order), then the other patches ascending, so the
    reference draws exactly the masks `mcf_fast.masking.random_masks` produced."""
    N, K = ids_keep.shape
    noise = torch.full((N, L), 2.0)
    noise += torch.arange(L, dtype=torch.float32) / (10 * L)  # removed patches: ascending index order
    noise.scatter_(1, ids_keep.long().cpu(), (torch.arange(K, dtype=torch.float32) / L).expand(N, K).contiguous())
    return noise.to(ids_keep.device)


def ref_encode(vit: VisionTransformer, imgs, mask_ratio, noise):
    x = vit.patch_embed(imgs)
    x = x + vit.pos_embed[:, 1:, :]
    x, mask, ids_restore = mae_masking(x, mask_ratio, noise)
    cls = vit.cls_token + vit.pos_embed[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x), mask, ids_restore


def ref_decode(model: MCFModel, x, ids_restore):
    x = model.decoder_embed(x)
    n_mask = ids_restore.shape[1] + 1 - x.shape[1]
    mask_tokens = model.mask_token.repeat(x.shape[0], n_mask, 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    return model.decoder_pred(model.decoder_norm(x))[:, 1:, :]


def ref_teacher_feats(vit: VisionTransformer, x, layers):
    size = vit.patch_embed.img_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = vit.embed_full(x)
    feats = []
    for i, blk in enumerate(vit.blocks):
        x = blk(x)
        if i in layers:
            feats.append(F.normalize(x.float(), dim=1))
        if i == max(layers):
            break
    return feats


def ref_losses(model: MCFModel, imgs, mask_ratio, noise1, noise2, rank: int = 0):
    """(total, perceptual, contrastive, pred image) exactly as docs/METHOD.md §2-§6 (EMA done by caller)."""
    latent, mask, ids_restore = ref_encode(model.encoder, imgs, mask_ratio, noise1)
    pred_patches = ref_decode(model, latent, ids_restore)
    pred = unpatchify(pred_patches, model.patch_size)
    if model.teacher_kind == "pixel":
        target = patchify(imgs, model.patch_size)
        if model.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss_p = (((pred_patches - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    else:
        vit = model._teacher_vit()
        layers = model.perceptual.layers
        real = [f.detach() for f in ref_teacher_feats(vit, imgs, layers)]  # autograd on, then detached
        fake = ref_teacher_feats(vit, pred, layers)
        loss_p = sum(F.mse_loss(a, b) for a, b in zip(fake, real))
    q = model.predictor(model.projector(latent[:, 0]))
    with torch.no_grad():
        k = model.target_projector(ref_encode(model.target_encoder, imgs, mask_ratio, noise2)[0][:, 0])
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(all_gather_nograd(k.float()), dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / model.temperature
    labels = torch.arange(logits.shape[0], device=logits.device) + logits.shape[0] * rank
    loss_c = F.cross_entropy(logits, labels) * (2 * model.temperature)
    loss = model.perceptual_weight * loss_p + model.contrastive_weight * loss_c
    return loss, loss_p, loss_c, pred


@torch.no_grad()
def ref_ema(model: MCFModel, m: float) -> None:
    """The reference's EMA: a Python loop, one small kernel pair per parameter."""
    for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters()):
        t.data = t.data * m + o.data * (1.0 - m)
    for t, o in zip(model.target_projector.parameters(), model.projector.parameters()):
        t.data = t.data * m + o.data * (1.0 - m)
