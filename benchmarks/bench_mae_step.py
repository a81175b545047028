"""What share of a whole MAE training step masking and the decoder un-shuffle are, and what patch_mae
changes in that step, on this machine.

    python benchmarks/bench_mae_step.py [--batch 16] [--reps 3] [--depth 12] [--json out.json]

The model is MAE's ViT-B/16 with its 8-block 512-d decoder and norm_pix loss, re-stated here from
facebookresearch/mae's semantics with mcf_fast's ViT blocks (same shapes and FLOPs; not MAE's code).
A step is forward + backward + torch.optim.AdamW (MAE's optimizer). Before timing, the patched and
unpatched models are checked to give the same loss for the same seed. Steps alternate between the
two so that load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import mcf_fast.kernels as K
import torch
from torch import nn

from mcf_fast.model.vit import Block, PatchEmbed, sincos_pos_embed


class MAEViT(nn.Module):
    """MAE's MaskedAutoencoderViT layout (names as MAE's), ViT-B/16 encoder, 512-d decoder."""

    def __init__(self, depth=12, dim=768, heads=12, dec_depth=8, dec_dim=512, dec_heads=16, img=224, p=16):
        super().__init__()
        self.p = p
        self.patch_embed = PatchEmbed(img, p, 3, dim)
        L = (img // p) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, img // p).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim).normal_(std=0.02))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dec_dim, img // p).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, p * p * 3)
        assert self.pos_embed.shape[1] == 1 + L

    def patchify(self, imgs):
        N, C, H, W = imgs.shape
        h = H // self.p
        x = imgs.reshape(N, C, h, self.p, h, self.p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * h, self.p * self.p * C)

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs, mask_ratio):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        N, T, D = x.shape
        mt = self.mask_token.repeat(N, ids_restore.shape[1] + 1 - T, 1)
        x_ = torch.gather(torch.cat([x[:, 1:, :], mt], dim=1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


def _ops_ms(model, x_tokens, dec_tokens, reps):
    """fwd+bwd ms of MAE's masking + un-shuffle (as the unpatched model runs them) at the step's shapes."""
    def run():
        xm, mask, restore = model.random_masking(x_tokens, 0.75)
        N, T, D = dec_tokens.shape
        mt = model.mask_token.repeat(N, restore.shape[1] + 1 - T, 1)
        x_ = torch.gather(torch.cat([dec_tokens[:, 1:], mt], 1), 1, restore.unsqueeze(-1).repeat(1, 1, D))
        out = torch.cat([dec_tokens[:, :1], x_], 1) + model.decoder_pos_embed
        (xm.sum() + out.sum()).backward()
    run()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=12, help="encoder blocks (12 = ViT-B)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    K.set_backend("cpu")
    base = MAEViT(depth=a.depth)
    patched = K.patch_mae(copy.deepcopy(base))
    imgs = torch.randn(a.batch, 3, 224, 224)
    losses = []
    for m in (base, patched):
        torch.manual_seed(1)
        losses.append(m(imgs)[0].item())
    if losses[0] != losses[1]:
        sys.exit(f"patched loss {losses[1]} != MAE's {losses[0]}: not timing a model that computes something else")
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (base, patched)}
    times = {"mae": [], "patched": []}
    for i in range(a.reps + 1):  # first round is a warm-up
        for name, m in (("mae", base), ("patched", patched)):
            t0 = time.perf_counter()
            loss = m(imgs)[0]
            loss.backward()
            opts[id(m)].step()
            opts[id(m)].zero_grad(set_to_none=True)
            if i:
                times[name].append((time.perf_counter() - t0) * 1e3)
    step = {k: statistics.median(v) for k, v in times.items()}
    x_tok = torch.randn(a.batch, 196, 768, requires_grad=True)
    d_tok = torch.randn(a.batch, 50, 512, requires_grad=True)
    ops = _ops_ms(base, x_tok, d_tok, max(a.reps, 5))
    res = dict(batch=a.batch, depth=a.depth, threads=torch.get_num_threads(), step_ms=step, step_samples_ms=times,
               mae_mask_unshuffle_ms=ops, share_of_mae_step=ops / step["mae"],
               patched_vs_mae_step=step["mae"] / step["patched"], loss=losses[0])
    print(f"MAE ViT-B batch {a.batch}: step {step['mae']:.0f} ms (MAE), {step['patched']:.0f} ms (patched), "
          f"ratio {res['patched_vs_mae_step']:.3f}; MAE's masking + un-shuffle fwd+bwd {ops:.1f} ms = "
          f"{res['share_of_mae_step']:.2%} of its step")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
