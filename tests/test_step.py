"""mcf_fast.train.step.TrainStep: the one training step the loop and the step benchmark share."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcf_fast.data.loader import Batch
from mcf_fast.model.mcf import MCFModel
from mcf_fast.train import step as step_mod
from mcf_fast.train.config import from_preset
from mcf_fast.train.optim import build_optimizer
from mcf_fast.train.runtime import Runtime
from mcf_fast.train.step import TrainStep

CPU = torch.device("cpu")


def _cfg(accum=1, ema="micro"):
    cfg = from_preset("demo")
    m = cfg.model
    m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads = 32, 8, 32, 1, 2
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.proj_hidden, m.proj_dim = 32, 1, 2, 64, 16
    m.teacher_img_size, m.teacher_patch_size, m.teacher_embed_dim = 32, 8, 32
    m.teacher_depth, m.teacher_num_heads, m.teacher_layers = 1, 2, (0,)
    cfg.optim.accum_steps, cfg.optim.ema_update = accum, ema
    return cfg


def _batches(n=4, count=16):
    g = torch.Generator().manual_seed(3)
    return iter([Batch(torch.randn(n, 3, 32, 32, generator=g), torch.arange(i * n, (i + 1) * n))
                 for i in range(count)])


def _step(cfg, model=None):
    model = model or MCFModel.from_config(cfg.model, seed=0).train()
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    return model, TrainStep(model, opt, cfg, Runtime(CPU, "fp32", 0, 1, 0))


class _NoHostRead(TorchDispatchMode):
    """Fails on any op that reads a computed (floating-point or bool) value back to the host: .item(),
    float(t), bool(t), torch.equal. On a GPU each is a sync. (Integer reads are masking.py's range check
    of CPU sample ids, which it skips for GPU tensors; a CPU-only test cannot tell devices apart.)"""
    BANNED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED and (args[0].is_floating_point() or args[0].dtype == torch.bool):
            raise AssertionError(f"host read of a computed value in the step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ema,expected", [("micro", 3), ("step", 1)])
def test_ema_updates_per_cadence(monkeypatch, ema, expected):
    """At accum 3 the EMA steps 3 times per optimizer step by default (the reference), once with 'step'."""
    calls = []
    real = step_mod.ema_update
    monkeypatch.setattr(step_mod, "ema_update", lambda t, o, m: (calls.append(m), real(t, o, m)))
    _, step = _step(_cfg(accum=3, ema=ema))
    batches = _batches()
    step(batches, 0, 1e-3, 0.9)
    step(batches, 1, 1e-3, 0.9)
    assert len(calls) == 2 * expected


@pytest.mark.parametrize("ema", ["micro", "step"])
def test_ema_target_values_per_cadence(ema):
    """One optimizer step at accum 2 moves the target to m^2 t + (1 - m^2) o ('micro') or m t + (1 - m) o
    ('step'): the online weights do not change between micro-steps, so the cadence shows in the values."""
    cfg = _cfg(accum=2, ema=ema)
    model, step = _step(cfg)
    t0 = [p.detach().clone() for p in model.ema_pairs()[0]]
    o0 = [p.detach().clone() for p in model.ema_pairs()[1]]
    m = 0.9
    step(_batches(), 0, 1e-3, m)
    w = m * m if ema == "micro" else m
    for t, a, b in zip(model.ema_pairs()[0], t0, o0):
        torch.testing.assert_close(t, w * a + (1 - w) * b, rtol=1e-6, atol=1e-7)


def test_step_reads_nothing_back_to_the_host():
    """A whole optimizer step (masks, EMA, forward, backward, clipped norm, fused AdamW, zero_grad) runs
    without one device-to-host read; its results are device tensors."""
    cfg = _cfg(accum=2)
    cfg.optim.clip_grad = 1.0
    _, step = _step(cfg)
    batches = _batches()
    step(batches, 0, 1e-3, 0.9)  # first call: lazy optimizer state
    with _NoHostRead():
        res = step(batches, 1, 1e-3, 0.9)
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in (res.loss, res.grad_norm, res.bad))
    assert float(res.bad) == 0.0 and torch.isfinite(res.loss)


def test_non_finite_step_is_skipped_on_the_device(monkeypatch):
    """A NaN loss flags the step bad, leaves every weight (and the optimizer's state) as it was, and
    clears the gradients."""
    cfg = _cfg()
    model, step = _step(cfg)
    batches = _batches()
    step(batches, 0, 1e-3, 0.9)
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(step.optimizer.state_dict())
    real = type(model).forward

    def nan_forward(self, *a, **kw):
        out = real(self, *a, **kw)
        out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(type(model), "forward", nan_forward)
    res = step(batches, 1, 1e-3, 1.0)  # momentum 1: the EMA leaves the target as it is
    assert float(res.bad) == 1.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("num_batches_tracked")
               and "running_" not in k)  # BatchNorm statistics move in any forward
    assert all(p.grad is None for p in model.parameters())
    steps = [s["step"] for s in step.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(steps, [s["step"] for s in state["state"].values()]))


def test_accumulated_losses_are_micro_batch_means():
    """At accum 2 the step's losses are the mean of its micro-batches' losses (the same micro-batches
    run one per step with the optimizer idle give them)."""
    cfg = _cfg(accum=2)
    model, step = _step(cfg)
    probe = copy.deepcopy(model)
    res = step(_batches(), 0, 0.0, 1.0)
    cfg1 = _cfg(accum=1)
    _, single = _step(cfg1, probe)
    batches = _batches()
    parts = [single(batches, j, 0.0, 1.0) for j in range(2)]  # lr 0, m 1: nothing moves between them
    for k in ("loss", "loss_perceptual", "loss_contrastive"):
        torch.testing.assert_close(getattr(res, k), sum(getattr(p, k) for p in parts) / 2, rtol=1e-5, atol=1e-6)


def test_bad_ema_cadence_is_refused():
    """An unknown optim.ema_update names the two choices."""
    cfg = _cfg()
    cfg.optim.ema_update = "epoch"
    with pytest.raises(ValueError, match="'micro'.*'step'"):
        _step(cfg)
    with pytest.raises(ValueError, match="optim.ema_update"):
        cfg.optim.validate()
