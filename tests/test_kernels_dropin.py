"""MAE drop-ins: random_masking / unshuffle_decoder_tokens / patch_mae give MAE's exact outputs.

MAE's recipe is re-stated here in plain torch from its semantics (argsort of uniform noise, argsort
again to restore, gather with an index repeated over D, a 0/1 float mask gathered back to patch
order; the decoder appends mask tokens, un-shuffles with a gather and re-attaches CLS).
"""
import copy

import mcf_fast.kernels as K
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    K.reset_backend()


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


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("N,L,D,ratio", [(1, 196, 123, 0.75), (4, 197, 16, 0.5), (3, 16, 8, 0.0),
                                         (2, 49, 64, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_masking_bit_identical_to_mae(backend, N, L, D, ratio, dtype):
    """Same noise -> identical x_masked, mask (dtype and values) and ids_restore as MAE's recipe."""
    K.set_backend(backend)
    x = torch.randn(N, L, D).to(dtype)
    noise = torch.rand(N, L)
    ours = K.random_masking(x, ratio, noise)
    ref = mae_masking(x, ratio, noise)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("N,L,D,ratio", [(1, 196, 123, 0.75), (4, 197, 16, 0.5), (3, 16, 8, 0.0)])
def test_unshuffle_bit_identical_to_mae(N, L, D, ratio):
    """Decoder un-shuffle equals MAE's repeat + cat + gather + cat, values and gradients."""
    K.set_backend("cpu")
    _, _, ids_restore = mae_masking(torch.zeros(N, L, 1), ratio, torch.rand(N, L))
    keep = int(L * (1 - ratio))
    x = torch.randn(N, 1 + keep, D, requires_grad=True)
    mt = torch.randn(1, 1, D, requires_grad=True)
    ours, ref = K.unshuffle_decoder_tokens(x, ids_restore, mt), mae_unshuffle(x, ids_restore, mt)
    assert torch.equal(ours, ref)
    g = torch.randn_like(ref)
    a, b = torch.autograd.grad(ours, (x, mt), g), torch.autograd.grad(ref, (x, mt), g)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-5)


def test_random_masking_without_noise_draws_like_mae():
    """noise=None draws torch.rand(N, L) on x's device, as MAE does: same seed, same masks."""
    x = torch.randn(3, 20, 4)
    torch.manual_seed(7)
    ours = K.random_masking(x, 0.75)
    torch.manual_seed(7)
    ref = mae_masking(x, 0.75, torch.rand(3, 20))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


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


def test_patch_mae_same_outputs_and_grads():
    """patch_mae(model): same seed -> same loss, prediction, mask and parameter gradients; deepcopy stays bound."""
    K.set_backend("cpu")
    model = TinyMAE()
    patched = K.patch_mae(copy.deepcopy(model))
    imgs = torch.randn(3, 16, 12)
    outs = []
    for m in (model, patched):
        torch.manual_seed(1)
        loss, pred, mask = m(imgs)
        loss.backward()
        outs.append((loss, pred, mask, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l0, p0, m0, g0), (l1, p1, m1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(p0, p1) and torch.equal(m0, m1)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g0, g1))
    twin = copy.deepcopy(patched)  # e.g. an EMA copy: its methods must use its own weights
    assert twin.forward_decoder.__self__ is twin and twin.random_masking.__self__ is twin


def test_patch_mae_refuses_other_models():
    """A model without MAE's attributes gets a TypeError naming what is missing."""
    with pytest.raises(TypeError, match="lacks .*forward_decoder"):
        K.patch_mae(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        K.patch_mae(object())
