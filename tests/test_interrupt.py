"""Ctrl-C / SIGTERM: the run stops at a step boundary, checkpoints when enough work would be lost, says
"interrupted at step N; rerun the same command to resume from step M" on the console and in train.log,
exits 130 without a traceback, and the rerun resumes exactly; a second signal stops at once; torchrun's
ranks stop after the same step; the demo stops the same way.

Run as a script, this file is the training command with one change: the loader sends signals to its own
process when it serves a given batch (`SIGNAL_AT="RANK:BATCH:SIG[,SIG...]"`; `SIG@group` signals the whole
process group, as a terminal's Ctrl-C does), so a signal lands at a known step, whatever the machine's speed.
The two tests that signal a real process launch it in the background from the session's start and run last.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from types import SimpleNamespace

import background
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_pretrain_e2e import ENV, TINY  # noqa: E402

ARGS = [*TINY, "--run.log_every", "2", "--run.ckpt_every", "4", "--run.tensorboard", "false",
        "--run.export", "false", "--max-steps", "6"]


# ----------------------------------------------------------------------------------- the signalling loader
class Signalling:
    """The run's loader, plus: when it serves batch `at` (counted in this process) on rank `rank`, it
    signals its own process with each of `sigs`."""

    def __init__(self, inner, rank: int, plan: str):
        r, at, sigs = plan.split(":")
        self.inner, self.served = inner, 0
        self.fire = (int(r) == rank, int(at), [(getattr(signal, f"SIG{s.split('@')[0]}"), s.endswith("@group"))
                                               for s in sigs.split(",")])

    def __iter__(self):
        return self

    def __next__(self):
        mine, at, sigs = self.fire
        if mine and self.served == at:
            for s, group in sigs:
                os.killpg(os.getpgid(0), s) if group else os.kill(os.getpid(), s)
        self.served += 1
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def signalling_loaders(monkeypatch_or_module, plan: str) -> list:
    """Make the loop build Signalling loaders; returns the list they are appended to."""
    import mcf_fast.train.loop as loop
    real, made = loop.build_pretrain_loader, []

    def build(cfg, **kw):
        made.append(Signalling(real(cfg, **kw), kw.get("rank", 0), plan))
        return made[-1]
    if hasattr(monkeypatch_or_module, "setattr"):
        monkeypatch_or_module.setattr(loop, "build_pretrain_loader", build)
    else:
        loop.build_pretrain_loader = build
    return made


def _worker(argv: list[str]) -> int:
    from mcf_fast import pretrain
    made = signalling_loaders(None, os.environ.get("SIGNAL_AT", "-1:-1:INT"))  # default: never signals
    rc = pretrain.main(argv)
    print(f"rank {os.environ.get('RANK', '0')}: exit {rc} after {made[-1].served} batches", flush=True)
    return rc


# ----------------------------------------------------------------------------------- helpers
def _cmd(out, *extra, ranks=1):
    script = [os.path.abspath(__file__), "--out", str(out), *ARGS, *extra]
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]


def _env(plan=None):
    env = dict(ENV, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if plan:
        env["SIGNAL_AT"] = plan
    return env


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoints(out):
    d = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(d) if os.path.exists(os.path.join(d, n, "COMPLETE"))) if os.path.isdir(d) else []


def _train(out, *extra):
    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import train
    cfg, _ = parse_args(["--out", str(out), *ARGS, *extra])
    return train(cfg)


KEYS = ("step", "loss", "loss_perceptual", "loss_contrastive", "grad_norm", "lr")
CTRL_C = ("--run.interrupt_ckpt_after_s", "0", "--data.workers", "2")
TORCHRUN = ("--run.interrupt_ckpt_after_s", "0", "--optim.batch_size", "4", "--run.precision", "fp32")
# The real processes two tests signal, launched in the background when the session starts (they import
# torch: seconds each); those tests run last and read the finished process: test -> (SIGNAL_AT, args, ranks).
LAUNCHES = {"test_ctrl_c_checkpoints_says_where_and_the_rerun_resumes_exactly": ("0:2:INT@group", CTRL_C, 1),
            "test_torchrun_ranks_stop_after_the_same_step": ("1:1:TERM", TORCHRUN, 2)}


def _launch(out: str, extra: tuple, ranks: int, env: dict) -> tuple:
    """(the finished command, its run folder); in its own session, so that INT@group reaches only it."""
    return background.run(_cmd(out, *extra, ranks=ranks), env=env, timeout=600), pathlib.Path(out)


def start_background(items) -> None:
    """Called by conftest once the session's tests are known (tests/background.py)."""
    names = set(LAUNCHES) if items is None else {i.name for i in items}
    for name, (plan, extra, ranks) in LAUNCHES.items():
        if name in names:
            background.start(name, _launch, os.path.join(background.workdir(), name, "run"), extra, ranks, _env(plan),
                             cost=4 * ranks)


def _launched(name: str) -> tuple:
    start_background([SimpleNamespace(name=name)])  # (already started by conftest)
    return background.result(name)


# ----------------------------------------------------------------------------------- the tests
@pytest.mark.late
def test_ctrl_c_checkpoints_says_where_and_the_rerun_resumes_exactly(tmp_path):
    """A real process with 2 loader workers, SIGINT to its process group (a terminal's Ctrl-C) during step 3
    of 6: it finishes step 3, writes checkpoint 3 (the threshold is 0 s here), prints the resume line
    (console and train.log), exits 130 with no traceback; rerunning the same command resumes at 3 and its
    metrics equal an uninterrupted run's (the window was mid-way)."""
    p, out = _launched("test_ctrl_c_checkpoints_says_where_and_the_rerun_resumes_exactly")
    line = "interrupted at step 3; rerun the same command to resume from step 3"
    assert p.returncode == 130, p.stderr[-3000:]
    assert line in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert line in (out / "train.log").read_text()
    assert _checkpoints(out) == ["step_00000003"]
    assert not (out / "summary.json").exists()
    _train(out, *CTRL_C)
    _train(tmp_path / "ref")  # no workers: the same batches (the loader's order does not depend on them)
    assert [{k: r[k] for k in KEYS} for r in _rows(out)] == [{k: r[k] for k in KEYS} for r in _rows(tmp_path / "ref")]


def test_sigterm_with_a_recent_checkpoint_saves_nothing_new(tmp_path, monkeypatch, capsys):
    """SIGTERM during step 6 of 8, the last checkpoint (step 4) seconds old: no checkpoint is written
    (the default threshold is minutes), the line names step 4, exit 130."""
    from mcf_fast import pretrain
    signalling_loaders(monkeypatch, "0:5:TERM")
    out = tmp_path / "run"
    assert pretrain.main(["--out", str(out), *ARGS, "--max-steps", "8"]) == 130
    line = "interrupted at step 6; rerun the same command to resume from step 4"
    assert line in capsys.readouterr().err and line in (out / "train.log").read_text()
    assert _checkpoints(out) == ["step_00000004"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone


def test_before_any_checkpoint_the_line_says_start_again(tmp_path, monkeypatch, capsys):
    """Interrupted before its first checkpoint and with little work done, the run says a rerun starts over."""
    from mcf_fast import pretrain
    signalling_loaders(monkeypatch, "0:0:INT")
    assert pretrain.main(["--out", str(tmp_path / "run"), *ARGS]) == 130
    assert "interrupted at step 1; rerun the same command to start again from step 0 (no checkpoint was " \
           "written yet)" in capsys.readouterr().err
    assert _checkpoints(tmp_path / "run") == []


def test_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    """A second signal (after the same-press window) stops in the middle of the step: no checkpoint, the
    line says so and names the last checkpoint, exit 130."""
    from mcf_fast import pretrain
    from mcf_fast.train import interrupt
    monkeypatch.setattr(interrupt, "SAME_PRESS_S", 0.0)
    signalling_loaders(monkeypatch, "0:5:INT,INT")
    out = tmp_path / "run"
    assert pretrain.main(["--out", str(out), *ARGS, "--run.interrupt_ckpt_after_s", "0"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 5 (second signal: stopped at once, without a checkpoint); rerun the same command " \
           "to resume from step 4" in err and "Traceback" not in err
    assert _checkpoints(out) == ["step_00000004"]


def test_signals_of_one_press_count_once():
    """Signals within SAME_PRESS_S of the first are the same press (a terminal's Ctrl-C reaches torchrun's
    workers directly and forwarded); later ones raise KeyboardInterrupt; the handlers are restored."""
    from mcf_fast.train.interrupt import StopSignals
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as s:
        assert not s.requested
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # within the same press: ignored
        assert s.requested and s.signum == signal.SIGINT
        s.first_at -= 10.0  # as if the first press were ten seconds ago
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_demo_stops_the_same_way(tmp_path, monkeypatch, capsys):
    """`python -m mcf_fast.pretrain` without arguments (the demo): Ctrl-C in the teacher stage ends the
    command with exit 130 and the resume line in that stage's train.log; the MCF stage never starts."""
    from mcf_fast import pretrain
    monkeypatch.chdir(tmp_path)
    signalling_loaders(monkeypatch, "0:0:INT")
    assert pretrain.main([]) == 130
    log = (tmp_path / "runs" / "demo" / "teacher" / "train.log").read_text()
    assert "interrupted at step 1; rerun the same command to start again from step 0" in log
    assert not (tmp_path / "runs" / "demo" / "config.json").exists()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.late
def test_torchrun_ranks_stop_after_the_same_step():
    """2 ranks under torchrun, SIGTERM to rank 1 only, during step 2: the ranks vote at each boundary and
    both stop after step 3 (the vote read at a boundary is the one started at the previous one), exit 130,
    write the interrupt checkpoint together (complete, world size 2), and rank 0's train.log has the line.
    (Resuming such a checkpoint is the single-process test above and tests/test_dist_train.py.)"""
    p, out = _launched("test_torchrun_ranks_stop_after_the_same_step")
    said = sorted(line for line in p.stdout.splitlines() if line.startswith("rank "))
    assert said == ["rank 0: exit 130 after 3 batches", "rank 1: exit 130 after 3 batches"], p.stderr[-4000:]
    assert "interrupted at step 3; rerun the same command to resume from step 3" in (out / "train.log").read_text()
    assert _checkpoints(out) == ["step_00000003"]
    with open(out / "checkpoints" / "step_00000003" / "COMPLETE") as f:
        assert json.load(f)["world_size"] == 2


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
