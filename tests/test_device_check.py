"""python -m benchmarks.device_check: without CUDA it runs to the end, reports every GPU step as skipped and
exits 0; its parsers read what pytest and the pre-training loop write; bad arguments are refused."""
import json
import os
import sys

import pytest
import torch

from benchmarks import device_check
from benchmarks.device_kit import items, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA report")
def test_cpu_run_skips_every_gpu_step_and_writes_the_report(tmp_path):
    """No CUDA: exit 0, every step 'skipped: no CUDA device', report.md/json and logs in --out."""
    out = tmp_path / "gpu"
    assert device_check.main(["--out", str(out), "--work", str(tmp_path / "work")]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["finished"] and [s["step"] for s in rep["steps"]] == [s.name for s in items.STEPS]
    assert all(s["status"] == "skipped" and s["summary"] == runner.NO_CUDA for s in rep["steps"]), rep["steps"]
    assert rep["machine"]["git_sha"] and "torch" in rep["machine"]
    md = (out / "report.md").read_text()
    assert md.count(runner.NO_CUDA) == len(items.STEPS) and "| git_sha |" in md
    assert sorted(os.listdir(out)) == ["artifacts.tar.gz", "logs.txt", "report.json", "report.md"]


@pytest.mark.parametrize("args,msg", [(("--out", "x", "--only", "gpu_test"), "unknown step"),
                                      ((), "--out DIR is required"),
                                      (("--out", "x", "--budget-s", "5"), "--budget-s 5")])
def test_bad_arguments_are_refused(args, msg, capsys):
    """An unknown step, a missing --out or an impossible budget: one line, exit 2, the problem named."""
    with pytest.raises(SystemExit) as e:
        device_check.main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_a_later_step_failure_keeps_earlier_results(tmp_path):
    """run_steps writes after each step; a crashing step is 'failed' and the next still runs."""
    calls = []

    def ok(ctx, deadline):
        return {"status": "passed", "summary": "fine"}

    def boom(ctx, deadline):
        raise RuntimeError("broken probe")

    steps = [runner.Step("a", "first", 10, 1, ok, needs_cuda=False),
             runner.Step("b", "second", 10, 1, boom, needs_cuda=False),
             runner.Step("c", "third", 10, 1, ok, needs_cuda=False),
             runner.Step("d", "gpu", 10, 1, ok)]
    ctx = runner.Context(root=ROOT, out=str(tmp_path), work=str(tmp_path), env=dict(os.environ),
                         log_path=str(tmp_path / "log"), cuda=False, python=sys.executable)
    runner.run_steps(ctx, steps, 60, lambda: calls.append(dict(ctx.results)))
    assert [len(c) for c in calls] == [1, 2, 3, 4]
    assert calls[0]["a"]["status"] == "passed"
    assert ctx.results["b"]["status"] == "failed" and "broken probe" in ctx.results["b"]["summary"]
    assert ctx.results["c"]["status"] == "passed" and ctx.results["d"]["summary"] == runner.NO_CUDA


def test_run_cmd_kills_at_the_deadline(tmp_path):
    """A child past its deadline is killed (exit None), its output kept in the log."""
    import time
    ctx = runner.Context(root=ROOT, out=str(tmp_path), work=str(tmp_path), env=dict(os.environ),
                         log_path=str(tmp_path / "log"), cuda=False, python=sys.executable)
    rc, out = runner.run_cmd(ctx, "sleeper", [sys.executable, "-c", "print('started', flush=True); "
                                              "import time; time.sleep(60)"], time.monotonic() + 3)
    assert rc is None and "started" in out and "sleeper: exit None" in (tmp_path / "log").read_text()


def test_parsers_read_junit_and_metrics(tmp_path):
    """parse_junit counts outcomes; summarize_metrics drops warm-up steps and sums data wait."""
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
        '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    c = items.parse_junit(str(tmp_path / "j.xml"))
    assert (c["passed"], c["failed"], c["skipped"], c["failed_ids"]) == (1, 1, 1, ["t::b"])
    rows = [{"step": i, "images_per_s": 100.0 * (i + 1), "step_time_s": 1.0, "data_time_s": 0.25,
             "peak_mem_mb": 10.0 * i, "loss": 1.0} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    m = items.summarize_metrics(str(tmp_path / "m.jsonl"), skip=3)
    assert m["steps_used"] == 3 and m["images_per_s"] == 500.0 and m["data_wait_share"] == 0.25
    assert m["peak_mem_mb"] == 50.0
    with pytest.raises(ValueError, match="warm-up"):
        items.summarize_metrics(str(tmp_path / "m.jsonl"), skip=6)
