"""python -m benchmarks.device_check: without CUDA it runs to the end, makes the cost sheet's predictions,
reports every GPU step as skipped and exits 0; the report sets predicted beside measured; its parsers read
what pytest and the pre-training loop write; bad arguments are refused."""
import json
import os
import sys

import pytest
import torch

from benchmarks import device_check
from benchmarks.device_kit import items, predict, runner, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_STEPS = [s.name for s in items.STEPS if s.needs_cuda]
QUANTITIES = ("images/s per GPU", "MFU of 989 TFLOP/s", "peak memory allocated")


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One CPU run of the kit (the traces it makes are memoised for the tests after it)."""
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA report")
    tmp = tmp_path_factory.mktemp("kit")
    code = device_check.main(["--out", str(tmp / "gpu"), "--work", str(tmp / "work")])
    return code, tmp / "gpu"


def test_cpu_run_skips_every_gpu_step_and_writes_the_report(cpu_report):
    """No CUDA: exit 0, the plan step passes, every GPU step 'skipped: no CUDA device', report.md/json and
    logs in --out."""
    code, out = cpu_report
    rep = json.loads((out / "report.json").read_text())
    assert code == 0 and rep["finished"] and [s["step"] for s in rep["steps"]] == [s.name for s in items.STEPS]
    gpu = [s for s in rep["steps"] if s["step"] in GPU_STEPS]
    assert len(gpu) == len(items.STEPS) - 1 and rep["steps"][0]["step"] == "plan"
    assert all(s["status"] == "skipped" and s["summary"] == runner.NO_CUDA for s in gpu), gpu
    assert rep["steps"][0]["status"] == "passed", rep["steps"][0]
    assert rep["machine"]["git_sha"] and "torch" in rep["machine"]
    md = (out / "report.md").read_text()
    runs_planned = 1 + len(runs.STEP_CONFIGS)  # each GPU step's row, then each prediction's measured cells
    assert md.count(f"| {runner.NO_CUDA} |") == len(GPU_STEPS) + runs_planned * len(QUANTITIES)
    assert "| git_sha |" in md
    assert sorted(os.listdir(out)) == ["artifacts.tar.gz", "logs.txt", "report.json", "report.md"]


def _sheet(capsys, argv):
    """The sheet as `python -m mcf_fast.plan ... --json` prints it."""
    from mcf_fast.plan import cli
    assert cli.main(argv + ["--gpu", "h200", "--json", "--loader-rate", "1000"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cpu_run_sets_the_sheets_predictions_beside_the_measurements(cpu_report, capsys):
    """Without CUDA the report already holds the prediction columns (images/s, MFU, peak memory for the
    pretrain run and both step-suite runs, planned for an H200), each measured cell 'skipped: no CUDA
    device'; the predicted numbers are those `python -m mcf_fast.plan --json` prints for the same settings."""
    _, out = cpu_report
    rep = json.loads((out / "report.json").read_text())
    rows = rep["predicted_vs_measured"]
    keys = ["pretrain"] + [f"step {p} {q}" for p, q in runs.STEP_CONFIGS]
    assert [(r["run"].split(" (")[0], r["quantity"]) for r in rows] == [(k, q) for k in keys for q in QUANTITIES]
    assert all(r["measured"] is None and r["note"] == runner.NO_CUDA for r in rows), rows
    step_argv = {f"step {p} {q}": ["--preset", p, "--model.teacher", "random", "--optim.batch_size",
                                   str(runs.STEP_BATCH), "--optim.accum_steps", "1", "--run.precision", q,
                                   "--data.workers", "0"] for p, q in runs.STEP_CONFIGS}
    argv = dict(step_argv, pretrain=runs.pretrain_args("random", "kit-pretrain-run"))
    for i, key in enumerate(keys):
        s = _sheet(capsys, argv[key])
        speed, mem = s["speed"]["range"], s["memory"]
        got = {r["quantity"]: r for r in rows[3 * i:3 * i + 3]}
        ips, mfu, peak = (got[q] for q in QUANTITIES)
        assert (ips["low"], ips["predicted"], ips["high"]) == tuple(speed[k]["images_per_s_per_gpu"]
                                                                 for k in ("low", "likely", "high"))
        assert (mfu["low"], mfu["predicted"], mfu["high"]) == tuple(speed[k]["mfu"] for k in ("low", "likely", "high"))
        assert (peak["predicted"], peak["needed"], peak["capacity"]) == (mem["allocated"], mem["needed"],
                                                                         mem["capacity"])
        assert s["run"]["machine"] == "H200 SXM 141GB" and s["run"]["world"] == 1
    md = (out / "report.md").read_text()
    assert "## predicted vs measured" in md and "| run | quantity | predicted | measured | measured / predicted |" in md
    assert "| predicted (the cost sheet) |" in md and f"{rows[0]['predicted']:,.0f} img/s" in md


def test_measurements_are_set_beside_the_predictions():
    """With measurements in the results (as the GPU steps write them), each row gets measured, the
    ratio to the likely prediction and whether it lies in the sheet's range; MFU is measured images/s x
    the sheet's FLOPs per image / the datasheet peak; a step-suite row measured at another batch says so."""
    plan = {"predictions": predict.predict(predict.gpu_for("a100"))}
    pre, vit_s = plan["predictions"][0], plan["predictions"][1]
    assert pre["machine"] == "A100 SXM 80GB" and pre["memory_capacity"] == 81920 * 2**20
    ips = pre["images_per_s"]["high"] * 2  # above the range
    results = {"plan": plan,
               "pretrain": {"status": "passed", "images_per_s": ips, "mfu": 0.5, "peak_mem_mb": 4096.0},
               "bench_step": {"status": "passed", "rows": [
                   {"suite": "step", "provider": "engine", "dtype": "bf16", "median_ms": 10.0, "peak_mib": 1024.0,
                    "extra": {"preset": "vit-s", "batch": 32, "images_per_s": vit_s["images_per_s"]["likely"],
                              "mfu": 0.3}}]}}
    rows = {(r["run"].split(" (")[0], r["quantity"]): r for r in predict.compare(results)}
    r = rows[("pretrain", "images/s per GPU")]
    assert r["measured"] == ips and r["ratio"] == pytest.approx(ips / pre["images_per_s"]["likely"])
    assert r["in_range"] is False
    m = rows[("pretrain", "MFU of 312 TFLOP/s")]
    assert m["measured"] == pytest.approx(ips * pre["flops_per_image"] / 312e12) and "50.0% of" in m["note"]
    assert rows[("pretrain", "peak memory allocated")]["measured"] == 4 * 2**30
    s = rows[("step vit-s bf16", "images/s per GPU")]
    assert s["ratio"] == pytest.approx(1.0) and s["in_range"] is True
    assert "MEASURED AT BATCH 32" in rows[("step vit-s bf16", "peak memory allocated")]["note"]
    assert rows[("step vit-b-paper bf16", "images/s per GPU")]["measured"] is None


def test_the_step_suite_runs_at_the_batch_the_sheet_plans(monkeypatch, tmp_path):
    """bench_step passes the configurations and the pinned batch that the predictions are made for."""
    seen = []
    monkeypatch.setattr(items, "run_cmd", lambda ctx, name, cmd, deadline, **kw: (seen.append(cmd), (1, ""))[1])
    ctx = runner.Context(root=ROOT, out=str(tmp_path), work=str(tmp_path), env={}, log_path=str(tmp_path / "log"),
                         cuda=True, python=sys.executable)
    items.bench_step(ctx, 0.0)
    cmd = seen[0]
    assert cmd[cmd.index("--step-batch") + 1] == str(runs.STEP_BATCH)
    assert cmd[cmd.index("--step-configs") + 1] == "vit-s:bf16,vit-b-paper:bf16"


def test_dry_run_prints_the_predictions(cpu_report, capsys):
    """--dry-run prints the steps and the predicted column, every measurement 'not run: --dry-run'."""
    assert device_check.main(["--out", "unused", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "predicted by the cost sheet" in out and out.count("not run: --dry-run") == 9
    assert not os.path.exists("unused")


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


@pytest.mark.parametrize("name, kind", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "h100")])
def test_the_gpu_it_is_on_picks_the_sheets_machine(monkeypatch, name, kind):
    """On a CUDA device the plan is for the device's kind (by its name; an unknown name at the H100's speed,
    said so) and its reported memory; --plan-gpu overrides the kind only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: type("P", (), {"total_memory": 3 << 30}))
    g = predict.gpu_for("auto")
    assert (g["kind"], g["memory_bytes"], g["device"]) == (kind, 3 << 30, name)
    assert ("knows no GPU" in g["why"]) == (name == "NVIDIA L40S")
    assert predict.gpu_for("a100")["kind"] == "a100" and predict.gpu_for("a100")["memory_bytes"] == 3 << 30
