"""Mask kinds are a registry: the config and the CLI ask it, the step draws the configured kind, a
run with block masks trains, and a new kind is one class, one registry line and this file's toy test."""
import json

import pytest
import torch

from mcf_fast import mask_algo as algo
from mcf_fast import masking as mk
from mcf_fast.data.loader import Batch
from mcf_fast.model.mcf import MCFModel
from mcf_fast.train.config import from_preset
from mcf_fast.train.optim import build_optimizer
from mcf_fast.train.runtime import Runtime
from mcf_fast.train.step import TrainStep

CPU = torch.device("cpu")


def _cfg(kind):
    cfg = from_preset("demo")
    m = cfg.model
    m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads = 32, 4, 32, 1, 2
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.proj_hidden, m.proj_dim = 32, 1, 2, 64, 16
    m.teacher_img_size, m.teacher_patch_size, m.teacher_embed_dim = 32, 8, 32
    m.teacher_depth, m.teacher_num_heads, m.teacher_layers = 1, 2, (0,)
    m.mask_kind, m.mask_ratio, cfg.data.img_size = kind, 0.5, 32
    cfg.run.seed = 11
    return cfg.validate()


def _one_step(cfg):
    """TrainStep over one micro-batch of 4 images with sample ids 20..23: (step, result)."""
    model = MCFModel.from_config(cfg.model, seed=0).train()
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    step = TrainStep(model, opt, cfg, Runtime(CPU, "fp32", 0, 1, 0))
    batch = Batch(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(20, 24))
    return step, step(iter([batch]), 0, 1e-3, 0.99)


def test_registry_holds_uniform_and_block():
    """Both built-in kinds are registered with a summary, the fields they read and a generator."""
    assert mk.MASK_KINDS.names() == ("uniform", "block")
    for kind in mk.MASK_KINDS:
        assert kind.summary and "model.mask_ratio" in kind.fields and callable(kind.generate)
    assert mk.MASK_KINDS.get("uniform").compiled and not mk.MASK_KINDS.get("block").compiled


def test_config_and_cli_ask_the_registry(capsys):
    """--model.mask_kind block validates; a misspelt kind is one line (exit 2) naming the choices."""
    assert _cfg("block").model.mask_kind == "block"
    with pytest.raises(ValueError, match=r"--model.mask_kind 'blok': unknown mask kind \(did you mean 'block'\?\)"):
        _cfg("blok")
    from mcf_fast.train.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model.mask_kind", "blok"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "choose one of uniform, block" in err[0]


def test_block_precheck_refuses_a_grid_it_cannot_take():
    """A patch grid beyond block masks' 4096 a side is refused before anything is built."""
    cfg = from_preset("demo")
    cfg.model.img_size, cfg.model.patch_size, cfg.model.mask_kind = 8200, 2, "block"
    cfg.data.img_size = 8200
    with pytest.raises(ValueError, match=r"--model.mask_kind 'block': a 4100x4100 patch grid is beyond its 4096"):
        cfg.validate()


@pytest.mark.parametrize("kind", ["uniform", "block"])
def test_step_draws_the_configured_kind(kind):
    """The step builds its generator once from the config and its masks are that kind's for the run's
    seed, the micro-step and the batch's sample ids."""
    cfg = _cfg(kind)
    step, res = _one_step(cfg)
    assert step.masks.kind is mk.MASK_KINDS.get(kind)
    want = mk.MASK_KINDS.get(kind).generate(4, (8, 8), 0.5, views=2, seed=11, step=0, sample_ids=torch.arange(20, 24),
                                            device=CPU, backend="torch")
    assert torch.equal(res.mask, want.mask[0]) and torch.isfinite(res.loss)


def test_run_with_block_masks_trains(tmp_path, monkeypatch):
    """`--model.mask_kind block` runs the real loop on block masks (one draw per step): finite, falling
    losses, the kind saved with the run."""
    from test_pretrain_e2e import TINY

    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import train
    steps = []
    real = mk.BlockMasks.generate
    monkeypatch.setattr(mk.BlockMasks, "generate", lambda *a, **k: (steps.append(k["step"]), real(*a, **k))[1])
    out = tmp_path / "run"
    cfg, _ = parse_args(["--out", str(out), "--max-steps", "12", *TINY, "--model.mask_kind", "block",
                         "--run.log_every", "2", "--run.tensorboard", "false", "--run.export", "false",
                         "--run.vis_every", "0"])
    assert train(cfg)["steps"] == 12 and steps == list(range(12))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 6 and all(r["skipped_nonfinite"] == 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert json.load(open(out / "config.json"))["model"]["mask_kind"] == "block"


class Stripes(mk.MaskKind):
    """The toy kind: keeps the K patches starting at (step + sample id) mod L, wrapping around."""

    name = "stripes"
    summary = "K consecutive patches kept, moving with the step (a test toy)"
    calls = []

    @classmethod
    def generate(cls, batch_size, grid, mask_ratio, *, views, seed, step, sample_ids, device, backend):
        cls.calls.append((batch_size, grid, views, step, backend))
        L = grid[0] * grid[1]
        K = mk.num_kept(L, mask_ratio)
        start = (step + sample_ids).repeat(views)[:, None]
        kept = (torch.arange(L, device=device) - start) % L < K
        return algo.emit(kept, K, views, batch_size)


def test_a_new_kind_is_one_class_and_one_registry_line():
    """A toy kind registered for this test only is accepted by the config and drawn by the step; it is
    gone from the choices afterwards."""
    with mk.MASK_KINDS.registered(Stripes):
        cfg = _cfg("stripes")
        Stripes.calls.clear()
        _, res = _one_step(cfg)
        assert Stripes.calls == [(4, (8, 8), 2, 0, "torch")]
        start = torch.arange(20, 24)[:, None]
        assert torch.equal(res.mask, (torch.arange(64) - start) % 64 >= 32)
    with pytest.raises(ValueError, match="unknown mask kind"):
        _cfg("stripes")
