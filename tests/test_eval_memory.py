"""Eval fits the machine: CPU-sized defaults said in the output, the peak estimated before any work, a setting
that cannot fit refused with the fix, and the real command's resident memory under its estimate."""
import os
import pathlib
import re
import sys

import background
import pytest
import torch

from mcf_fast.eval.__main__ import main
from mcf_fast.eval.config import EvalConfig
from mcf_fast.eval.memory import GB, estimate, fitting_batch, step_bytes
from mcf_fast.eval.tasks import TASK_CLASSES
from mcf_fast.eval.toydata import write_aflw19, write_lapa
from mcf_fast.model.vit import VisionTransformer, save_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0, qkv_bias=True)


def make_sets(root: pathlib.Path) -> pathlib.Path:
    """A tiny exported encoder, an AFLW-19 folder and a LaPa folder under `root`."""
    torch.manual_seed(2)
    save_encoder(VisionTransformer(**ARCH), str(root / "enc"))
    write_aflw19(str(root / "aflw"), 14, 40, seed=1, train_count=9)
    write_lapa(str(root / "lapa"), {"train": 6, "val": 1, "test": 3}, 40, seed=1)
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return make_sets(tmp_path_factory.mktemp("mem"))


def _readme_command(work: str, env: dict) -> dict:
    """README's `eval paper` command on sets made by another process (so that this one's peak resident memory
    is the command's alone): {'rc', 'out', 'err', 'maxrss' (bytes)}."""
    work = pathlib.Path(work)
    work.mkdir()
    made = background.run([sys.executable, "-c", "import pathlib, sys; from test_eval_memory import make_sets; "
                           "make_sets(pathlib.Path(sys.argv[1]))", str(work / "sets")], timeout=600, env=env)
    if made.returncode != 0:
        return {"rc": made.returncode, "out": "", "err": made.stderr, "maxrss": 0}
    sets = work / "sets"
    # tests/peak_of.py: the command's own peak (VmHWM); the ru_maxrss wait4 gives would include this
    # runner's, which Linux carries into a child across fork and exec
    peak = work / "peak.txt"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "peak_of.py"), str(peak), "mcf_fast.eval", "paper",
           "--encoder", str(sets / "enc"), "--aflw19", str(sets / "aflw"), "--lapa", str(sets / "lapa"),
           "--out", str(work / "o"), "--max-steps", "1", "--head-width", "64", "--workers", "0", "--no-progress"]
    p = background.run(cmd, timeout=900, env=env)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr,
            "maxrss": int(peak.read_text()) if peak.exists() else 0}


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: README's command is queued in the background
    (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_readme_paper_command_fits_under_its_estimate" for i in items):
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
        background.start("eval_readme", _readme_command, os.path.join(background.workdir(), "eval_readme"), env,
                         cost=6)


def test_estimate_is_linear_in_the_batch_and_counts_the_optimizer():
    """The activation trace extrapolated from batch 2 and 3 equals a trace at batch 6; weights count 7 fp32
    copies with the EMA (weights, 2 moments, 2 update temporaries, EMA, scored copy), 5 without."""
    cfg = EvalConfig(task="parsing", data="d", encoder="e", out="o", head_width=16, batch_size=6).resolved()
    e = estimate(cfg, ARCH, TASK_CLASSES["parsing"])
    six, params = step_bytes(cfg, ARCH, TASK_CLASSES["parsing"], 6)
    assert e.activations() == pytest.approx(six, rel=0.01)
    assert e.weights == params * 4 * 7
    no_ema = estimate(EvalConfig(**{**cfg.__dict__, "ema_decay": 0.0}), ARCH, TASK_CLASSES["parsing"])
    assert no_ema.weights == params * 4 * 5
    assert fitting_batch(e, e.at_batch(9) + 1.0, 2) == 9 and fitting_batch(e, 1.0, 2) == 0


def test_farl_at_448_batch_40_is_refused_before_anything_is_written(sets, tmp_path, capsys):
    """FaRL's 448 px / batch 40 on a small budget: exit 2, one line with the estimate and the batch that fits,
    no traceback, no output folder."""
    out = tmp_path / "o"
    rc = main(["paper", "--encoder", str(sets / "enc"), "--aflw19", str(sets / "aflw"), "--lapa", str(sets / "lapa"),
               "--out", str(out), "--img-size", "448", "--batch-size", "40", "--memory-budget-gb", "12",
               "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    line = [s for s in err if s.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in "\n".join(err)
    assert re.search(r"at 448 px, batch 40: about \d+\.\d GB .* but 12\.0 GB is the --memory-budget-gb: use --batch-size "
                     r"\d+ \(about \d+\.\d GB\)", line[0]), line[0]
    rc = main(["alignment", "--data", str(sets / "aflw"), "--encoder", str(sets / "enc"), "--out", str(out),
               "--img-size", "448", "--batch-size", "2", "--memory-budget-gb", "0.3", "--no-progress"])
    assert rc == 2 and "use a smaller --img-size" in capsys.readouterr().err and not out.exists()


@pytest.mark.late
def test_readme_paper_command_fits_under_its_estimate():
    """`python -m mcf_fast.eval paper --encoder --aflw19 --lapa --out` as README writes it (plus one step, a
    64-channel head and loading in-process so one process holds all the memory): CPU-sized defaults said on
    stdout, and the peak resident memory stays under the logged estimate and 3 GB. (The command runs in the
    background from the session's start.)"""
    start_background(None)  # (already started by conftest)
    r = background.result("eval_readme")
    out, err = r["out"], r["err"]
    assert r["rc"] == 0, err[-3000:]
    assert "on a CPU: --img-size 32 (the encoder's) and --batch-size 8" in out and "| this checkpoint, best" in out
    estimates = [float(x) for x in re.findall(r"memory estimate: .*?about (\d+\.\d) GB", err)]
    assert len(estimates) >= 4  # both tasks before any work, then each task as it starts
    rss = r["maxrss"]
    assert rss > 200e6, rss  # measured (the interpreter with torch alone is more)
    assert rss <= max(estimates) * GB and rss < 3 * GB, (rss / GB, estimates)


def test_gpu_runs_are_checked_against_the_devices_free_memory(monkeypatch):
    """On a GPU the budget is the device's free memory and only activations, weights and workspace count."""
    from mcf_fast.eval import memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(0.5 * GB), int(80 * GB)))
    cfg = EvalConfig(task="alignment", data="d", encoder="e", out="o", head_width=16, batch_size=4,
                     device="cuda").resolved()
    limit, source = memory.budget(cfg)
    assert limit == 0.5 * GB and source == "free on cuda"
    e = estimate(cfg, ARCH, TASK_CLASSES["alignment"])
    assert e.on_gpu and e.total == pytest.approx(e.activations() + e.weights + memory.SLACK)
    with pytest.raises(memory.MemoryBudgetError, match="free on cuda"):
        memory.check_memory(EvalConfig(**{**cfg.__dict__, "batch_size": 100000}), ARCH, TASK_CLASSES["alignment"])
