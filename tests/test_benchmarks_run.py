"""`python -m benchmarks.run` and the other benchmark entry points: one-line errors before any work, whole
`--help` sentences, the budget holding with what it skipped named, and a --quick run end to end (the
smoke test of every suite) that leaves no temporary folder behind."""
import glob
import importlib
import json
import os
import pathlib
import subprocess
import sys

import background
import pytest
import torch

from benchmarks import run as RUN
from benchmarks.cli import first_paragraph
from benchmarks.rows import reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("run", "device_check", "bench_mae_step", "memory_ckpt", "bench_detect", "eval_chain", "quote")


def _refused(capsys, argv, fn=RUN.parse) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_arguments_are_one_line_exit_2_before_any_work(capsys, tmp_path):
    """Unknown suites, impossible numbers, a missing or foreign --compare file, --out naming a file and
    CUDA without a GPU: one line naming the fix, exit 2, nothing written."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    out = str(tmp_path / "out")
    cases = [(["--suite", "kernel"], "choose from kernels, masks, data, step"),
             (["--step-batch", "1"], "needs 2 samples"), (["--budget-s", "-1"], ">= 0"),
             (["--compare", str(tmp_path / "missing.json")], "no such file"),
             (["--compare", str(tmp_path / "notes.json")], "not a report.json"),
             (["--out", str(tmp_path / "file")], "is a file"),
             (["--step-configs", "vit-l:bf16"], "PRESET:PRECISION pairs from"),
             (["--threads", "x"], "invalid int value")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "use --device cpu"))
    for argv, msg in cases:
        assert msg in _refused(capsys, argv + ["--out", out] if "--out" not in argv else argv), argv
    assert not os.path.exists(out)


def test_an_unwritable_out_is_refused_before_measuring(capsys, tmp_path, monkeypatch):
    """--out inside a folder this user cannot write to: one line naming that folder, before any work."""
    monkeypatch.setattr(RUN.os, "access", lambda path, mode: path != str(tmp_path))
    assert f"{tmp_path} is not writable" in _refused(capsys, ["--out", str(tmp_path / "new" / "bench")])


def test_running_the_file_names_the_module_command():
    """`python benchmarks/run.py ARGS` stops at once (exit 2) with the command that works."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "python -m benchmarks.run --quick" in p.stderr, p.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_shows_the_whole_first_paragraph(name, capsys):
    """Every entry point's --help opens with its docstring's whole first paragraph, ending a sentence."""
    mod = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as e:
        (mod.build_parser().parse_args if name == "run" else mod.main)(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps the text (also after hyphens)
    para = first_paragraph(mod.__doc__)
    assert e.value.code == 0 and para.endswith((".", ")")) and "".join(para.split()) in text, para


def test_a_spent_budget_measures_nothing_and_says_what_it_skipped(tmp_path, capsys):
    """With almost no budget, every suite is skipped without measuring: each row says why, the report
    lists every skipped measurement by name, and all artefacts are still written."""
    out = tmp_path / "bench"
    assert RUN.main(["--suite", "all", "--quick", "--budget-s", "0.01", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert not [r for r in rep["rows"] if r["median_ms"]]
    assert all(reason(r["note"]).startswith("not measured (") for r in rep["rows"]), rep["rows"]
    skipped = " ".join(rep["budget"]["skipped"])
    for what in ("kernels gather_visible fwd", "masks N=256", "data suite", "step demo fp32", "step demo bf16"):
        assert what in skipped, what
    assert "Not measured for lack of budget" in (out / "report.md").read_text()
    assert sorted(os.listdir(out)) == ["memory.png", "report.json", "report.md", "speedups.png", "step_phases.png"]


QUICK = ["--suite", "all", "--device", "cpu", "--quick", "--budget-s", "3000", "--step-batch", "2"]


def _quick_run(work: str, env: dict) -> tuple:
    """`python -m benchmarks.run QUICK --out WORK/bench` as a user types it, with WORK/tmp as its TMPDIR:
    (the finished process, the report folder, the temporary folder)."""
    out, tmp = os.path.join(work, "bench"), os.path.join(work, "tmp")
    os.makedirs(tmp)
    p = background.run([sys.executable, "-m", "benchmarks.run", *QUICK, "--out", out], cwd=ROOT, timeout=1800,
                       env=dict(env, TMPDIR=tmp))
    return p, out, tmp


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the quick run is queued in the background
    (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_quick_run_writes_every_artefact" for i in items):
        background.start("quick_run", _quick_run, os.path.join(background.workdir(), "quick_run"), dict(os.environ),
                         cost=55)


@pytest.mark.late
def test_quick_run_writes_every_artefact():
    """`--suite all --quick` (CI; at batch 2, the smallest step): every artefact is written, every suite
    reports measured rows with ratios, the step suite checks and times engine vs reference on the demo
    preset, every other row says why it is not measured, the Markdown report is printed last, and no
    temporary folder is left. The budget is large so that machine load cannot drop a measurement (that
    path is tested above). The command runs in its own interpreter, started with the session."""
    start_background(None)  # (already started by conftest)
    p, out, tmp = background.result("quick_run")
    assert p.returncode == 0, p.stderr[-6000:]
    stdout, out = p.stdout, pathlib.Path(out)
    for f in ("report.json", "report.md", "speedups.png", "memory.png", "step_phases.png", "profile_step.txt"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "step_tmp").exists() and not glob.glob(os.path.join(tmp, "mcf_bench_*")), os.listdir(tmp)
    rep = json.loads((out / "report.json").read_text())
    for k in ("cpu", "cores", "torch", "triton", "dali", "git", "date", "matmul_peak"):
        assert k in rep["machine"], k
    rows = rep["rows"]
    for suite in ("kernels", "masks", "data", "step"):
        measured = [r for r in rows if r["suite"] == suite and r["median_ms"]]
        assert measured and any(r["is_baseline"] for r in measured), suite
        for r in measured:
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and (r["speedup"] or 1) > 0, r
    assert {r["provider"] for r in rows if r["suite"] == "kernels" and r["is_baseline"]} == \
        {"gather_visible_ref", "scatter_to_full_ref", "reference.mae_masking", "info_nce_ref"}
    step = {r["provider"]: r for r in rows if r["suite"] == "step" and r["dtype"] == "fp32" and r["median_ms"]}
    assert set(step) == {"engine", "reference"}
    e = step["engine"]["extra"]
    assert e["images_per_s"] > 0 and e["mfu"] > 0 and e["gflop_per_step"] > 0
    assert sum(e["phases_ms"].values()) == pytest.approx(step["engine"]["median_ms"], rel=0.5)
    assert step["engine"]["peak_mib"] > e["state_mib"] > 0
    for r in rows:  # every row is measured, or a labelled model, or says why it is not measured
        assert r["median_ms"] or reason(r["note"]).startswith(("not measured (", "model, not measured")), r
    assert not any(r["suite"] == "projection" for r in rows)  # the demo preset is not the paper-size model
    assert rep["budget"]["skipped"] == []
    md = (out / "report.md").read_text()
    assert "None" not in next(ln for ln in md.splitlines() if ln.startswith("Machine:")) and "not measured:" not in md
    assert md.splitlines()[2] == f"`python -m benchmarks.run {' '.join(QUICK)} --out {out}`"
    assert stdout.rstrip().splitlines()[-1].startswith("Times: median") and "| engine |" in stdout
