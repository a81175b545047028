"""MAE drop-ins: random_masking / unshuffle_decoder_tokens / patch_mae give MAE's exact outputs.

MAE's recipe and a small MAE-shaped model are re-stated in tests/mae_tiny.py; what survives copies,
pickling and wrappers is in tests/test_kernels_patch.py.
"""
import copy

import mcf_fast.kernels as K
import pytest
import torch
from mae_tiny import TinyMAE, mae_masking, mae_unshuffle
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    K.reset_backend()


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


def test_patch_mae_on_a_vit_mae_with_norm_pix():
    """An MAE with real ViT blocks and norm_pix loss (benchmarks/bench_mae_step.py's, small): patched = MAE, bit for bit."""
    from benchmarks.bench_mae_step import MAEViT
    K.set_backend("cpu")
    model = MAEViT(depth=2, dim=64, heads=4, dec_depth=1, dec_dim=32, dec_heads=4, img=32, p=8)
    patched = K.patch_mae(copy.deepcopy(model))
    imgs = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (model, patched):
        torch.manual_seed(5)
        loss, pred, mask = m(imgs)
        loss.backward()
        outs.append((loss, pred, mask, [p.grad for p in m.parameters() if p.grad is not None]))
    (l0, p0, m0, g0), (l1, p1, m1, g1) = outs
    assert torch.equal(l0, l1) and torch.equal(p0, p1) and torch.equal(m0, m1)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
