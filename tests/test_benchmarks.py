"""benchmarks/run.py: the harness's statistics, memory and FLOP counting, the report writers, and a
`--quick` run end to end (the CI smoke test of every suite)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness as H  # noqa: E402
import report as R  # noqa: E402

RUN = os.path.join(ROOT, "benchmarks", "run.py")


def test_summary_matches_numpy_percentiles():
    """median / p20 / p80 are numpy's linear-interpolated percentiles of the samples."""
    s = list(np.random.default_rng(1).exponential(3.0, size=17))
    st = H.summarize(s)
    assert st["n"] == 17
    assert st["median_ms"] == pytest.approx(np.percentile(s, 50))
    assert st["p20_ms"] == pytest.approx(np.percentile(s, 20))
    assert st["p80_ms"] == pytest.approx(np.percentile(s, 80))


def test_measure_times_each_call_on_fresh_inputs():
    """setup runs before every call (warm-up included), each call sees its own input, and the clock
    sees a 20 ms sleep as >= 20 ms."""
    seen = []
    k = iter(range(100))

    def setup():
        return (next(k),)

    def fn(i):
        seen.append(i)
        time.sleep(0.02)
    ms = H.measure(fn, setup, warmup=2, reps=3)
    assert len(ms) == 3 and seen == [0, 1, 2, 3, 4]
    assert all(19.0 <= m < 500 for m in ms)
    with pytest.raises(ValueError, match="reps"):
        H.measure(fn, setup, reps=0)


cpu_peak = pytest.mark.skipif(not H.cpu_peak_supported()[0], reason="no /proc/self/clear_refs (not Linux)")


@cpu_peak
def test_cpu_peak_sees_a_transient_allocation():
    """A call that touches 64 MiB and frees it peaks at ~64 MiB; a call that allocates nothing at ~0."""
    def alloc():
        t = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.5)
        return float(t[-1])
    got = H.peak_bytes(alloc) / 2**20
    assert 60 <= got <= 80, got
    assert H.peak_bytes(lambda: None) / 2**20 < 8


@cpu_peak
def test_cpu_peak_excludes_memory_live_before_the_call():
    """Memory held before the call does not count; only what the call adds on top."""
    held = torch.randn(24 * 2**20 // 4 * 4)  # ~96 MiB live before and during the call

    def alloc():
        t = torch.empty(4 * 2**20, dtype=torch.float32).fill_(2.0)
        return float(t[0] + held[0])
    got = H.peak_bytes(alloc) / 2**20
    assert 12 <= got <= 28, got


def test_other_load_excludes_our_own_work():
    """The other-processes share is a fraction of the machine in [0, 1] with our own busy loop
    subtracted (neighbours' load cannot be controlled here, so no tighter bound is asserted)."""
    ol = H.OtherLoad()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
        pass
    share = ol.share()
    if share is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= share <= 1.0


def test_checks_reject_a_provider_that_differs():
    """A provider that does less (or other) work than the reference is refused before timing."""
    a = torch.randn(64)
    H.check_equal("same", (a, a.clone()), (a, a))
    with pytest.raises(H.ProviderMismatch, match="output 1"):
        H.check_equal("gather", (a, a[:32]), (a, a))
    b = a.clone()
    b[3] += 1e-3
    assert H.check_close("close", b, a, rtol=1e-2, atol=1e-2) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(H.ProviderMismatch, match="differs"):
        H.check_close("loss", b, a, rtol=1e-5, atol=1e-6)


def test_sdpa_flops_are_counted_on_cpu():
    """The CPU flash-attention op, invisible to torch's FlopCounterMode, is counted with torch's
    own SDPA formulas: 4 b h s^2 d forward, 10 b h s^2 d backward (scores recomputed)."""
    import suite_step as SS
    b, h, s, d = 2, 3, 40, 16
    q = torch.randn(b, h, s, d, requires_grad=True)

    def fn():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    got = SS.count_flops(fn, [q])
    assert got["total"] == (4 + 10) * b * h * s * s * d
    assert q.grad is None  # the fake backward must not leave a gradient behind


def test_ratios_compare_and_unmeasured_rows():
    """speed-up and memory ratios are taken against the group's baseline; --compare matches rows by
    (suite, what, shape, dtype, provider); unmeasured rows carry their reason and no ratio."""
    st = lambda m: {"median_ms": m, "p20_ms": m * 0.9, "p80_ms": m * 1.1, "n": 5}  # noqa: E731
    rows = [R.row("kernels", "op", "N=4", "fp32", "base", is_baseline=True, stats=st(10.0), peak_bytes=4 * 2**20),
            R.row("kernels", "op", "N=4", "fp32", "ours", stats=st(4.0), peak_bytes=2**20),
            R.row("kernels", "op", "N=4", "fp32", "ours[triton]", note=H.NO_GPU)]
    R.add_ratios(rows)
    assert rows[1]["speedup"] == pytest.approx(2.5) and rows[1]["mem_ratio"] == pytest.approx(0.25)
    assert rows[2]["speedup"] is None and rows[2]["note"] == H.NO_GPU
    old = {"rows": [dict(rows[1], median_ms=5.0)], "machine": {"git": "abc", "date": "d"}}
    txt = R.compare({"rows": rows}, old)
    assert "-20.0%" in txt and "ours" in txt
    assert "no row measured in both" in R.compare({"rows": rows}, {"rows": []})


def test_engine_step_is_the_training_step():
    """The step suite times mcf_fast.train.step.TrainStep itself: two timed steps leave the weights
    bit-equal to two plain TrainStep calls, and every phase is reported."""
    import suite_step as SS

    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train.optim import build_optimizer
    from mcf_fast.train.runtime import Runtime
    from mcf_fast.train.step import TrainStep
    cfg = SS._config("demo")
    m = cfg.model
    m.depth, m.decoder_depth, m.teacher_depth, m.teacher_layers, m.proj_hidden = 1, 1, 1, (0,), 64
    cfg.data.synthetic_size = 16  # the loader draws its faces up front
    cpu = torch.device("cpu")
    timed_model, plain_model = MCFModel.from_config(m, seed=0).train(), MCFModel.from_config(m, seed=0).train()
    timed = SS.TimedTrainStep(timed_model, cfg, SS._loader(cfg, 2, cpu), cpu, "fp32")
    assert isinstance(timed.step, TrainStep)
    phases = [timed(), timed()]
    assert all(set(p) == {"data", "forward", "backward", "optimizer_ema", "total"} for p in phases)
    assert all(p["total"] == pytest.approx(sum(v for k, v in p.items() if k != "total")) for p in phases)
    opt = build_optimizer(plain_model, 1.5e-4, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), cpu)
    plain, batches = TrainStep(plain_model, opt, cfg, Runtime(cpu, "fp32", 0, 1, 0)), iter(SS._loader(cfg, 2, cpu))
    for i in range(2):
        plain(batches, i, 1.5e-4, cfg.optim.momentum)
    for (name, a), b in zip(timed_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name


def test_cli_explains_bad_arguments(tmp_path):
    """Unknown suites and a CUDA request without a GPU fail before any work, naming the fix."""
    p = subprocess.run([sys.executable, RUN, "--suite", "kernel", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "choose from kernels, masks, data, step" in p.stderr
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, RUN, "--device", "cuda", "--out", str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode != 0 and "use --device cpu" in p.stderr


def test_quick_run_writes_every_artefact(tmp_path):
    """`run.py --suite all --quick` (CI): every artefact is written, every suite reports measured rows
    with ratios, the step suite checks and times engine vs reference on the demo preset, every other
    row says why it is not measured, and the Markdown table is printed last. Nothing asserted depends
    on machine load: a quick run's budget never drops a configuration (the timeout only guards a hang)."""
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, RUN, "--suite", "all", "--device", "cpu", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=3000, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for f in ("report.json", "report.md", "speedups.png", "memory.png", "step_phases.png", "profile_step.txt"):
        assert (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    m = rep["machine"]
    for k in ("cpu", "cores", "torch", "triton", "dali", "git", "date", "matmul_peak"):
        assert k in m, k
    rows = rep["rows"]
    for suite in ("kernels", "masks", "data", "step"):
        measured = [r for r in rows if r["suite"] == suite and r["median_ms"]]
        assert measured and any(r["is_baseline"] for r in measured), suite
        for r in measured:
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["speedup"] > 0, r
    step = {r["provider"]: r for r in rows if r["suite"] == "step" and r["dtype"] == "fp32" and r["median_ms"]}
    assert set(step) == {"engine", "reference"}
    e = step["engine"]["extra"]
    assert e["images_per_s"] > 0 and e["mfu"] > 0 and e["gflop_per_step"] > 0
    assert sum(e["phases_ms"].values()) == pytest.approx(step["engine"]["median_ms"], rel=0.5)
    assert step["engine"]["peak_mib"] > e["state_mib"] > 0
    assert any(r["note"] == H.NO_GPU for r in rows)
    for r in rows:  # every row is measured, or a labelled model, or says why it is not measured
        assert r["median_ms"] or R.reason(r["note"]).startswith(("not measured (", "model, not measured")), r
    assert not any(r["suite"] == "projection" for r in rows)  # the demo preset is not the paper-size model
    md = (out / "report.md").read_text()
    assert "None" not in md.splitlines()[2] and "not measured:" not in md
    assert p.stdout.rstrip().splitlines()[-1].startswith("Times: median")
    assert "| engine |" in p.stdout
