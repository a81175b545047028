"""What share of a whole MAE training step the masking and the decoder un-shuffle are, and what
patch_mae changes in that step, on this machine.

    python -m benchmarks.bench_mae_step [--batch 16] [--reps 3] [--depth 12] [--threads N] [--json out.json]

The model is MAE's ViT-B/16 with its 8-block 512-d decoder and norm_pix loss, laid out as MAE names
it (so `patch_mae` recognises it) with mcf_fast's ViT blocks (same shapes and FLOPs; not MAE's code);
its masking and un-shuffle are the project's statements of MAE's formulation
(`mcf_fast.model.reference.mae_masking`, `mcf_fast.kernels.scatter_to_full_ref`). A step is forward
+ backward + torch.optim.AdamW (MAE's optimizer). Before timing, the patched and unpatched models are
checked to give the same loss for the same seed; the harness then alternates their steps so that load
from other processes hits both alike.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.bench_mae_step\n")
    raise SystemExit(2)

import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import mcf_fast.kernels as K  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mcf_fast.model.reference import mae_masking  # noqa: E402
from mcf_fast.model.vit import Block, PatchEmbed, sincos_pos_embed  # noqa: E402

from .cli import Parser  # noqa: E402
from .harness import measure  # noqa: E402


class MAEViT(nn.Module):
    """MAE's MaskedAutoencoderViT layout (names as MAE's), ViT-B/16 encoder, 512-d decoder."""

    def __init__(self, depth=12, dim=768, heads=12, dec_depth=8, dec_dim=512, dec_heads=16, img=224, p=16):
        super().__init__()
        self.p = p
        self.patch_embed = PatchEmbed(img, p, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, img // p).unsqueeze(0), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim).normal_(std=0.02))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dec_dim, img // p).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[Block(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, p * p * 3)

    def patchify(self, imgs):
        N, C, H, W = imgs.shape
        h = H // self.p
        x = imgs.reshape(N, C, h, self.p, h, self.p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * h, self.p * self.p * C)

    def random_masking(self, x, mask_ratio):
        return mae_masking(x, mask_ratio, torch.rand(x.shape[0], x.shape[1], device=x.device))

    def forward_encoder(self, imgs, mask_ratio):
        x, mask, ids_restore = self.random_masking(self.patch_embed(imgs) + self.pos_embed[:, 1:, :], mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat((cls, x), dim=1))), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = K.scatter_to_full_ref(self.decoder_embed(x), ids_restore, self.mask_token, self.decoder_pos_embed[0])
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:, :]

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


def ops_ms(model: MAEViT, batch: int, reps: int) -> float:
    """Median fwd+bwd ms of the unpatched model's masking + un-shuffle alone, at the step's shapes."""
    x = torch.randn(batch, 196, 768, requires_grad=True)
    tokens = torch.randn(batch, 50, 512, requires_grad=True)

    def run():
        xm, _, restore = model.random_masking(x, 0.75)
        out = K.scatter_to_full_ref(tokens, restore, model.mask_token, model.decoder_pos_embed[0])
        (xm.sum() + out.sum()).backward()
    return statistics.median(measure({"ops": run}, warmup=1, reps=reps)["ops"])


def main(argv=None) -> dict:
    ap = Parser(__doc__, "python -m benchmarks.bench_mae_step")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=12, help="encoder blocks (12 = ViT-B)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.reps < 1 or a.depth < 1 or a.threads < 0:
        ap.error("--batch, --reps and --depth must be >= 1, --threads >= 0")
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

    def step(m):
        m(imgs)[0].backward()
        opts[id(m)].step()
        opts[id(m)].zero_grad(set_to_none=True)
    times = measure({"mae": lambda: step(base), "patched": lambda: step(patched)}, warmup=1, reps=a.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ops = ops_ms(base, a.batch, max(a.reps, 5))
    res = dict(batch=a.batch, depth=a.depth, threads=torch.get_num_threads(), step_ms=med, step_samples_ms=times,
               mae_mask_unshuffle_ms=ops, share_of_mae_step=ops / med["mae"],
               patched_vs_mae_step=med["mae"] / med["patched"], loss=losses[0])
    print(f"MAE ViT-B batch {a.batch}: step {med['mae']:.0f} ms (MAE), {med['patched']:.0f} ms (patched), "
          f"ratio {res['patched_vs_mae_step']:.3f}; MAE's masking + un-shuffle fwd+bwd {ops:.1f} ms = "
          f"{res['share_of_mae_step']:.2%} of its step")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
