"""The report on made-up rows: the charts, labels, reasons, header, budget line, --compare and the
projections say what was measured, and nothing here depends on how busy the machine is."""
import os

import pytest

from benchmarks import charts as C
from benchmarks import rows as R
from benchmarks import tables as T
from benchmarks.harness import NO_GPU
from benchmarks.suite_step import projections

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ST = lambda m: {"median_ms": m, "p20_ms": m * 0.9, "p80_ms": m * 1.1, "n": 5}  # noqa: E731


def _rows():
    """A baseline and two providers per group: one faster (2x), one slower (0.53x), one unmeasured."""
    rows = []
    for what, shape in (("train step demo", "batch 16"), ("gather_visible", "N=64 L=196 D=768 r=0.75")):
        suite = "step" if "step" in what else "kernels"
        ex = dict(preset="demo", batch=16, phases_ms=dict(data=1.0, forward=2.0, backward=3.0, optimizer_ema=1.0)) \
            if suite == "step" else {}
        rows += [R.row(suite, what, shape, "fp32", "baseline", is_baseline=True, stats=ST(10.0), peak_bytes=8 * 2**20,
                       **ex),
                 R.row(suite, what, shape, "fp32", "fast", stats=ST(5.0), peak_bytes=2 * 2**20, **ex),
                 R.row(suite, what, shape, "fp32", "slow", stats=ST(10 / 0.53), peak_bytes=16 * 2**20, **ex),
                 R.row("kernels", what, shape, "bf16", "mcf_fast[triton]", note="not measured: no GPU")]
    R.add_ratios(rows)
    return rows


def test_ratio_bars_are_centred_at_one():
    """A 2x bar spans [1, 2] to the right, a 0.53x bar [0.53, 1] to the left; the 1.0 line is drawn; axis symmetric."""
    rows = [r for r in _rows() if r["speedup"] and not r["is_baseline"]]
    fig, ax = plt.subplots()
    C.ratio_bars(ax, rows, [r["speedup"] for r in rows], "x")
    ends = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert all(1.0 in e for e in ends)  # every bar starts at 1.0
    spans = sorted((min(e), max(e)) for e in ends)
    want = sorted((min(1.0, r["speedup"]), max(1.0, r["speedup"])) for r in rows)
    assert spans == [(pytest.approx(a), pytest.approx(b)) for a, b in want]
    assert any(tuple(ln.get_xdata()) == (1.0, 1.0) for ln in ax.lines)
    lo, hi = ax.get_xlim()
    assert lo < 0.53 and hi > 2 and lo * hi == pytest.approx(1.0)
    plt.close(fig)
    fig, ax = plt.subplots()  # one 460x row: the axis stops at RATIO_CAP and the bar says it is off scale
    C.ratio_bars(ax, rows[:2], [460.0, 0.5], "x")
    assert ax.get_xlim()[1] == pytest.approx(C.RATIO_CAP)
    assert max(p.get_x() + p.get_width() for p in ax.patches) == pytest.approx(C.RATIO_CAP)
    assert any(t.get_text() == "460x (off scale)" for t in ax.texts)
    plt.close(fig)


def test_chart_labels_do_not_overlap_or_repeat_words():
    """Tick labels: unique, no word twice ("batch batch 16"), and their boxes do not overlap once drawn."""
    rows = [r for r in _rows() if r["speedup"] and not r["is_baseline"]] * 4  # 16 bars
    labels = [C.label(r) for r in rows]
    assert C.label(rows[0]) == "train step demo batch 16 fp32 [fast]"
    for text in labels:
        words = text.rsplit(" [", 1)[0].lower().split()
        assert len(words) == len(set(words)), text
    fig, ax = plt.subplots(figsize=(10, C._fig_height(rows)))
    C.ratio_bars(ax, rows, [r["speedup"] for r in rows], "x")
    fig.tight_layout()
    fig.canvas.draw()
    boxes = sorted((t.get_window_extent() for t in ax.get_yticklabels()), key=lambda b: b.y0)
    assert len(boxes) == 16 and all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:]))
    plt.close(fig)


def test_missing_values_read_as_not_measured_why():
    """Unmeasured cells and the header say 'not measured (why)' / 'not installed', never a bare '-' or None."""
    assert R.reason("not measured: no GPU") == "not measured (no GPU)"
    assert R.reason("model, not measured: 5 GFLOP") == "model, not measured: 5 GFLOP"
    md = T.rows_table(_rows())
    assert "not measured (no GPU)" in md and "not measured:" not in md
    m = dict(cpu="AMD EPYC", cores=2, torch_threads=2, cpu_bf16="none", torch="2.14.1", triton=None, dali=None,
             python="3.11", git="abc", date="today", loadavg_start=1.0)
    line = T.machine_line(m)
    assert "DALI not installed" in line and "triton not installed" in line and "None" not in line
    assert "matmul peak: not measured (only the step suite measures it" in line
    step = T.step_table([R.row("step", "train step vit-s", "-", "bf16", "engine", preset="vit-s",
                               note="not measured: the run's --budget-s was used up")])
    assert "not measured (the run's --budget-s was used up)" in step


def test_every_chart_is_written_even_with_nothing_measured(tmp_path):
    """speedups.png, memory.png and step_phases.png exist when no step and no ratio could be measured."""
    rows = [R.row("step", "train step demo", "-", "fp32", p, is_baseline=b, preset="demo",
                  note="not measured: the run's --budget-s was used up") for p, b in (("engine", False), ("reference", True))]
    rep = {"rows": rows, "device": "cpu", "quick": True}
    paths = C.plot(str(tmp_path), rep)
    assert sorted(os.path.basename(p) for p in paths) == ["memory.png", "speedups.png", "step_phases.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    rows = _rows()
    assert [os.path.basename(p) for p in C.plot(str(tmp_path), {"rows": rows, "device": "cpu", "quick": False})] == \
        ["speedups.png", "memory.png", "step_phases.png"]


def test_projection_only_for_the_paper_size_model():
    """H100 projections come from the vit-b-paper preset alone, labelled as a model, at the cost sheet's
    likely MFU (the same number `python -m mcf_fast.plan` uses); a demo result gives none."""
    demo = {"preset": "demo", "flops_per_image_engine": 2e9}
    paper = {"preset": "vit-b-paper", "flops_per_image_engine": 175e9}
    assert projections([demo]) == []
    (p,) = projections([demo, paper, dict(paper)])
    assert "(model)" in p["what"] and p["note"].startswith("model, not measured")
    from mcf_fast.plan.hardware import H100
    likely = H100.mfu_range()["likely"][0]
    assert 0.2 < likely < 0.4 and p["extra"]["images_per_s"] == pytest.approx(likely * 989e12 / 175e9)


def test_ratios_compare_and_unmeasured_rows():
    """speed-up and memory ratios are taken against the group's baseline; --compare matches rows by
    (suite, what, shape, dtype, provider); unmeasured rows carry their reason and no ratio."""
    rows = [R.row("kernels", "op", "N=4", "fp32", "base", is_baseline=True, stats=ST(10.0), peak_bytes=4 * 2**20),
            R.row("kernels", "op", "N=4", "fp32", "ours", stats=ST(4.0), peak_bytes=2**20),
            R.row("kernels", "op", "N=4", "fp32", "ours[triton]", note=NO_GPU)]
    R.add_ratios(rows)
    assert rows[1]["speedup"] == pytest.approx(2.5) and rows[1]["mem_ratio"] == pytest.approx(0.25)
    assert rows[2]["speedup"] is None and rows[2]["note"] == NO_GPU
    old = {"rows": [dict(rows[1], median_ms=5.0)], "machine": {"git": "abc", "date": "d"}}
    txt = T.compare({"rows": rows}, old)
    assert "| kernels | op | N=4 | fp32 | ours | 5.000 | 4.000 | -20.0% |" in txt and "Change vs abc" in txt
    assert "no row measured in both" in T.compare({"rows": rows}, {"rows": []})


def test_tables_are_column_lists():
    """A table is its list of columns: one more (header, align, cell) tuple is one more column, aligned."""
    cols = [("a", "l", lambda x: x["a"]), ("b", "r", lambda x: f"{x['b']:.1f}")]
    assert T.md_table(cols, [{"a": "x|y", "b": 2}]) == "| a | b |\n|---|---:|\n| x/y | 2.0 |"
    assert len(T.ROW_COLUMNS) == len(T.rows_table([]).splitlines()[1].strip("|").split("|"))


def test_budget_line_names_what_was_skipped():
    """The report says the budget, how long measuring took, and each measurement the budget left out."""
    line = T.budget_line({"budget_s": 120, "measure_s": 101.4, "skipped": ["step demo bf16 (12 s left)"]})
    assert line.startswith("Budget: 120 s (--budget-s); measuring took 101 s.")
    assert "Not measured for lack of budget (1): step demo bf16 (12 s left)." in line
    assert "Not measured" not in T.budget_line({"budget_s": 120, "measure_s": 3, "skipped": []})


def test_documents_quote_their_committed_reports():
    """Every headline block in docs/performance.md is exactly what its committed report.json generates,
    and a quote names the report, its command, the machine and its load."""
    from benchmarks import quote
    doc = os.path.join(quote.ROOT, "docs", "performance.md")
    assert quote.stale(doc) == []
    text = open(doc).read()
    paths = [m.group("path") for m in quote.BLOCK.finditer(text)]
    assert paths and all(os.path.exists(os.path.join(quote.ROOT, p)) for p in paths)
    q = quote.quote(paths[0])
    assert q.startswith(f"From `{paths[0]}` (`python -m benchmarks.run") and "load average" in q
    assert quote.refresh(text.replace(q, "stale numbers\n")) == text
