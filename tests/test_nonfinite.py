"""Non-finite steps are skipped on the device and counted; too many in a row stop the run, keeping a finite checkpoint."""
import json
import os

import pytest
import torch
from test_pretrain_e2e import TINY

from mcf_fast.model import mcf as mcf_mod
from mcf_fast.train.cli import parse_args
from mcf_fast.train.loop import NonFiniteError, train


def _cfg(out, steps, *extra):
    cfg, _ = parse_args(["--out", str(out), "--max-steps", str(steps), *TINY, "--run.log_every", "2",
                         "--run.ckpt_every", "4", "--run.tensorboard", "false", "--run.export", "false", *extra])
    return cfg


def _poison(monkeypatch, bad_calls):
    """Make the forward's loss NaN on the given (0-based) forward calls."""
    real = mcf_mod.MCFModel.forward
    calls = {"n": 0}

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        i = calls["n"]
        calls["n"] += 1
        if i in bad_calls:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(mcf_mod.MCFModel, "forward", forward)


def test_isolated_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """Two NaN steps: no update happens on them, the run finishes, metrics count 2 skipped steps."""
    _poison(monkeypatch, {3, 4})
    train(_cfg(tmp_path / "r", 8))
    rows = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert rows[-1]["skipped_nonfinite"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_too_many_nan_steps_stop_and_keep_finite_checkpoint(tmp_path, monkeypatch):
    """Consecutive NaN steps beyond run.max_nonfinite stop with a clear error; the finite checkpoint stays."""
    _poison(monkeypatch, set(range(5, 100)))
    with pytest.raises(NonFiniteError, match="consecutive non-finite"):
        train(_cfg(tmp_path / "r", 40, "--run.max_nonfinite", "3"))
    ck = tmp_path / "r" / "checkpoints"
    names = sorted(os.listdir(ck))
    assert "step_00000004" in names
    marker = json.load(open(ck / "step_00000004" / "COMPLETE"))
    assert marker["finite"] is True
