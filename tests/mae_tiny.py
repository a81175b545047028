"""MAE's masking, decoder un-shuffle and a small MAE-shaped model, re-stated for the drop-in tests.

MAE's recipe in plain torch from its semantics (facebookresearch/mae `models_mae.py`): argsort of
uniform noise, argsort again to restore, gather with an index repeated over D, a 0/1 float mask
gathered back to patch order; the decoder appends mask tokens, un-shuffles with a gather and
re-attaches CLS. Module-level (importable by name) so that whole models pickle.
"""
import torch
from torch import nn


def mae_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :keep] = 0
    return x_masked, torch.gather(mask, 1, ids_restore), ids_restore


def mae_unshuffle(x, ids_restore, mask_token):
    N, T, D = x.shape
    mt = mask_token.repeat(N, ids_restore.shape[1] + 1 - T, 1)
    x_ = torch.cat([x[:, 1:, :], mt], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
    return torch.cat([x[:, :1, :], x_], dim=1)


class TinyMAE(nn.Module):
    """An MAE-shaped model (linear stand-ins for the transformer blocks), methods as MAE names them."""

    def __init__(self, L=16, p=12, D=32, Dd=24):
        super().__init__()
        self.patch_embed = nn.Linear(p, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + L, D), requires_grad=False)
        self.blocks = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, 1 + L, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([nn.Linear(Dd, Dd) for _ in range(2)])
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, p)

    def random_masking(self, x, mask_ratio):
        return mae_masking(x, mask_ratio, torch.rand(x.shape[0], x.shape[1], device=x.device))

    def forward_encoder(self, patches, mask_ratio):
        x = self.patch_embed(patches) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        x = mae_unshuffle(x, ids_restore, self.mask_token) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, patches, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(patches, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = (((pred - patches) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask
