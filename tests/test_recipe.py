"""The reference code's recipe outside the step, switch by switch, and which presets follow it."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.reference import noise_for, ref_losses
from mcf_fast.model.teacher import PerceptualLoss, build_teacher_vit
from mcf_fast.train.config import PRESETS, from_preset
from mcf_fast.train.optim import cosine_lr, param_groups

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
          decoder_num_heads=2, proj_hidden=48, proj_dim=16,
          teacher_arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), teacher_layers=(0, 1))
PAPER = dict(head_init="xavier", patch_embed_bias="conv_default", teacher_resize="nearest")


def _linears(seq):
    return [m for m in seq if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("mode", ["torch", "xavier"])
def test_head_init(mode):
    """(a) 'xavier' draws projector/predictor weights in the xavier-uniform range (reaching past PyTorch's
    default bound); 'torch' keeps the default; the target projector starts equal to the online one."""
    model = MCFModel(**KW, teacher="pixel", head_init=mode)
    for lin in _linears(model.projector) + _linears(model.predictor):
        fan_out, fan_in = lin.weight.shape
        xavier, default = math.sqrt(6 / (fan_in + fan_out)), 1 / math.sqrt(fan_in)
        top = float(lin.weight.detach().abs().max())
        if mode == "xavier":
            assert top <= xavier + 1e-6 and top > 0.95 * xavier and xavier > 1.2 * default
        else:
            assert top <= default + 1e-6
    for a, b in zip(model.projector.state_dict().values(), model.target_projector.state_dict().values()):
        assert torch.equal(a, b)


def test_patch_embed_bias():
    """(b) 'conv_default' keeps Conv2d's uniform(+-1/sqrt(C p p)) bias (the reference's); 'zeros' zeroes it."""
    zero = MCFModel(**KW, teacher="pixel")
    assert not zero.encoder.patch_embed.proj.bias.any()
    conv = MCFModel(**KW, teacher="pixel", patch_embed_bias="conv_default")
    b = conv.encoder.patch_embed.proj.bias
    bound = 1 / math.sqrt(3 * 8 * 8)
    assert float(b.abs().max()) <= bound and float(b.abs().max()) > 0.8 * bound and float(b.abs().min()) > 0
    assert torch.equal(conv.target_encoder.patch_embed.proj.bias, b)


def test_weight_decay_groups_follow_timm_add_weight_decay():
    """(c) decay_tokens=True: no decay exactly for 1-D tensors and biases (timm 0.3.2), so cls_token and
    mask_token decay; the default still exempts them."""
    model = MCFModel(**KW, teacher="pixel")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05, decay_tokens=True)
    want_nd = {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    want_d = {n for n, p in model.named_parameters() if p.requires_grad} - want_nd
    assert {names[id(p)] for p in no_decay["params"]} == want_nd
    assert {names[id(p)] for p in decay["params"]} == want_d
    assert {"encoder.cls_token", "mask_token"} <= want_d
    _, nd_default = param_groups(model, 0.05)
    assert {"encoder.cls_token", "mask_token"} <= {names[id(p)] for p in nd_default["params"]}


def test_warmup_from_zero_is_maes_schedule():
    """(d) warmup_from_zero: lr equals MAE's adjust_learning_rate at epoch fraction step/steps_per_epoch,
    so the first step has lr 0; the default starts at base/warmup."""
    steps_per_epoch, epochs, warm_epochs, base, lo = 10, 5, 1, 2.0, 0.1
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * warm_epochs

    def mae(epoch):  # MAE util/lr_sched.adjust_learning_rate, re-stated
        if epoch < warm_epochs:
            return base * epoch / warm_epochs
        return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * (epoch - warm_epochs) / (epochs - warm_epochs)))

    for s in range(total):
        assert cosine_lr(s, total, warmup, base, lo, from_zero=True) == pytest.approx(mae(s / steps_per_epoch))
    assert cosine_lr(0, total, warmup, base, lo, from_zero=True) == 0.0
    assert cosine_lr(0, total, warmup, base, lo) == pytest.approx(base / warmup)


def test_teacher_resize_nearest_always():
    """(e) 'nearest' feeds the teacher F.interpolate(x, size) (nearest) even at equal sizes; 'bilinear'
    resizes only when the sizes differ."""
    vit = build_teacher_vit("random", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), seed=0)
    x = torch.randn(2, 3, 48, 48)
    near = PerceptualLoss(vit, (0, 1), 32, resize="nearest")
    assert torch.equal(near._prep(x, vit), F.interpolate(x, size=32))
    bil = PerceptualLoss(vit, (0, 1), 32)
    assert torch.equal(bil._prep(x, vit), F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    assert not torch.equal(near._prep(x, vit), bil._prep(x, vit))
    y = torch.randn(2, 3, 32, 32)
    assert torch.equal(near._prep(y, vit), y) and torch.equal(bil._prep(y, vit), y)
    with pytest.raises(ValueError, match="resize"):
        PerceptualLoss(vit, (0, 1), 32, resize="bicubic")


def test_switches_leave_the_step_exact():
    """The reference-recipe switches change init and resize only: losses and gradients still equal the
    plain re-statement of docs/METHOD.md (teacher at the input size, where nearest is the identity)."""
    torch.manual_seed(2)
    model = MCFModel(**KW, teacher="random", **PAPER)
    N, L, K = 4, 16, 4
    gen = torch.Generator().manual_seed(5)
    keep1 = torch.stack([torch.randperm(L, generator=gen)[:K].sort().values for _ in range(N)])
    keep2 = torch.stack([torch.randperm(L, generator=gen)[:K].sort().values for _ in range(N)])
    n1 = noise_for(keep1, L)
    restore1 = torch.argsort(torch.argsort(n1, 1), 1)
    mask1 = torch.ones(N, L, dtype=torch.bool).scatter_(1, keep1, False)
    imgs = torch.randn(N, 3, 32, 32)
    out = model(imgs, keep1, restore1, mask1, keep2)
    out.loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, lp, lc, _ = ref_losses(model, imgs, 0.75, n1, noise_for(keep2, L))
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_perceptual, lp.detach(), rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        if p.grad is not None:
            atol = 1e-5 * float(p.grad.abs().max()) + 1e-9
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_presets_say_which_recipe():
    """vit-b-paper follows the reference in all five switches; demo and vit-s keep this project's choices."""
    paper = from_preset("vit-b-paper")
    assert (paper.model.head_init, paper.model.patch_embed_bias, paper.model.teacher_resize) == \
        ("xavier", "conv_default", "nearest")
    assert paper.optim.decay_tokens and paper.optim.warmup_from_zero
    for name in set(PRESETS) - {"vit-b-paper"}:
        c = from_preset(name)
        assert (c.model.head_init, c.model.patch_embed_bias, c.model.teacher_resize) == ("torch", "zeros", "bilinear")
        assert not c.optim.decay_tokens and not c.optim.warmup_from_zero
    m = from_preset("demo").model
    m.head_init = "kaiming"
    with pytest.raises(ValueError, match="model.head_init"):
        m.validate()


TINY = ["--model.img_size", "32", "--model.patch_size", "8", "--model.embed_dim", "32", "--model.depth", "1",
        "--model.num_heads", "2", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
        "--model.decoder_num_heads", "2", "--model.proj_hidden", "32", "--model.proj_dim", "16",
        "--model.teacher", "pixel", "--optim.batch_size", "4", "--data.synthetic_size", "16",
        "--optim.warmup_steps", "4", "--optim.lr", "1e-2", "--optim.weight_decay", "0.5",
        "--optim.warmup_from_zero", "true", "--run.log_every", "1", "--run.progress", "none",
        "--run.threads", "1", "--run.tensorboard", "false", "--max-steps", "2"]


def _run(out, *extra):
    from safetensors.torch import load_file

    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import train
    cfg, _ = parse_args(["--out", str(out), *TINY, *extra])
    train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    cls0 = MCFModel.from_config(cfg.model, seed=cfg.run.seed).encoder.cls_token.detach()  # the run's initial cls_token
    return rows, load_file(os.path.join(out, "encoder.safetensors")), cls0


def test_training_run_uses_the_switches(tmp_path):
    """Through the training loop: step 1 runs at lr 0, and with decay_tokens only cls_token's update
    differs, by exactly lr * wd * its value (AdamW's decoupled decay), every other encoder tensor equal."""
    rows, plain, cls0 = _run(tmp_path / "a")
    assert [r["lr"] for r in rows[:2]] == [0.0, pytest.approx(1e-2 / 4)]
    _, decayed, _ = _run(tmp_path / "b", "--optim.decay_tokens", "true")
    for k in plain:
        if k != "cls_token":
            assert torch.equal(plain[k], decayed[k]), k
    # step 1 (lr 0) changes nothing; step 2 decays cls_token from its initial value
    torch.testing.assert_close(plain["cls_token"] - decayed["cls_token"], 1e-2 / 4 * 0.5 * cls0,
                               rtol=1e-3, atol=1e-8)
