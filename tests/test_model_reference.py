"""The engine's MCF losses and gradients equal the plain re-statement of docs/METHOD.md (model/reference.py)."""
import pytest
import torch

from mcf_fast.model.mcf import MCFModel, ema_update
from mcf_fast.model.reference import noise_for, ref_ema, ref_losses

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
            decoder_depth=2, decoder_num_heads=4, proj_hidden=64, proj_dim=16,
            teacher_arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
            teacher_layers=(0, 1, 3))


def _masks(N, L, K, gen):
    keep = torch.stack([torch.randperm(L, generator=gen)[:K].sort().values for _ in range(N)])
    removed = torch.stack([torch.tensor([i for i in range(L) if i not in set(r.tolist())]) for r in keep])
    shuffle = torch.cat([keep, removed], 1)
    restore = torch.argsort(shuffle, 1)
    mask = torch.ones(N, L, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return keep, restore, mask


@pytest.mark.parametrize("teacher", ["random", "ema", "pixel"])
@pytest.mark.parametrize("embed_mode", ["gather_pixels", "embed_all"])
def test_losses_and_grads_match_reference(teacher, embed_mode):
    """Total/perceptual/contrastive losses and every parameter gradient equal the reference (fp32)."""
    torch.manual_seed(1)
    cfg = dict(TINY, teacher_layers=(0, 1)) if teacher == "ema" else TINY  # the EMA encoder has 2 blocks
    model = MCFModel(**cfg, teacher=teacher, embed_mode=embed_mode, norm_pix_loss=(teacher == "pixel"))
    N, L = 5, model.encoder.num_patches
    ratio = 0.75
    K = int(L * (1 - ratio))
    gen = torch.Generator().manual_seed(3)
    keep1, restore1, mask1 = _masks(N, L, K, gen)
    keep2, _, _ = _masks(N, L, K, gen)
    imgs = torch.randn(N, 3, 32, 32)

    out = model(imgs, keep1, restore1, mask1, keep2)
    out.loss.backward()
    g_engine = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, lp, lc, pred = ref_losses(model, imgs, ratio, noise_for(keep1, L), noise_for(keep2, L))
    loss.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(out.loss_perceptual, lp.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss_contrastive, lc.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred.detach(), pred.detach(), rtol=1e-5, atol=1e-5)
    assert set(g_engine) == set(g_ref)
    assert not any(n.startswith(("target_", "perceptual.")) for n in g_engine), "frozen parts got gradients"
    for n in g_ref:
        # fp32 sums in another order (linear on gathered patches vs conv on all): scale atol to the gradient.
        atol = 1e-5 * float(g_ref[n].abs().max()) + 1e-9
        torch.testing.assert_close(g_engine[n], g_ref[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_teacher_gets_no_parameter_gradient_but_pred_does():
    """The perceptual loss reaches the decoder through the teacher while the teacher stays frozen."""
    model = MCFModel(**TINY, teacher="random")
    N, L = 3, model.encoder.num_patches
    gen = torch.Generator().manual_seed(0)
    keep, restore, mask = _masks(N, L, L // 4, gen)
    out = model(torch.randn(N, 3, 32, 32), keep, restore, mask, keep)
    (out.loss_perceptual * 0 + model.perceptual_weight * model.perceptual(out.pred, torch.randn(N, 3, 32, 32))).backward()
    assert all(p.grad is None for p in model.perceptual.parameters())
    assert model.decoder_pred.weight.grad is not None and model.decoder_pred.weight.grad.abs().sum() > 0


def test_foreach_ema_equals_python_loop():
    """The foreach EMA equals the reference's per-parameter loop theta_t = m theta_t + (1 - m) theta_o."""
    a = MCFModel(**TINY, teacher="pixel")
    with torch.no_grad():
        for p in list(a.encoder.parameters()) + list(a.projector.parameters()):
            p.add_(torch.randn_like(p))
    b = MCFModel(**TINY, teacher="pixel")
    b.load_state_dict(a.state_dict())
    before = {n: t.clone() for n, t in a.target_encoder.named_parameters()}
    ema_update(*a.ema_pairs(), 0.99)
    ref_ema(b, 0.99)
    moved = 0
    for (n, x), (_, y) in zip(list(a.target_encoder.named_parameters()) + list(a.target_projector.named_parameters()),
                              list(b.target_encoder.named_parameters()) + list(b.target_projector.named_parameters())):
        # one rounding apart at most: fused multiply-add vs two products
        torch.testing.assert_close(x, y, rtol=2e-7, atol=1e-8)
        moved += int(n in before and not torch.equal(x, before[n]))
    assert moved > 0, "the EMA update did not move the target"


@pytest.mark.parametrize("teacher", ["random", "ema"])
def test_activation_checkpointing_changes_nothing_but_memory(teacher):
    """Encoder/decoder and teacher activation checkpointing give the same losses and gradients."""
    cfg = dict(TINY, teacher_layers=(0, 1)) if teacher == "ema" else TINY
    torch.manual_seed(2)
    plain = MCFModel(**cfg, teacher=teacher)
    ckpt = MCFModel(**cfg, teacher=teacher, grad_ckpt=True, teacher_grad_ckpt=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt._teacher_vit().grad_ckpt
    gen = torch.Generator().manual_seed(5)
    N, L = 4, plain.encoder.num_patches
    keep, restore, mask = _masks(N, L, L // 4, gen)
    keep2, _, _ = _masks(N, L, L // 4, gen)
    imgs = torch.randn(N, 3, 32, 32)
    grads = []
    for m in (plain, ckpt):
        out = m(imgs, keep, restore, mask, keep2)
        out.loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        grads[-1]["__loss"] = out.loss.detach()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
