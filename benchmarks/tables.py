"""report.md and `--compare` for benchmarks/run.py: rows -> Markdown.

Every table is a list of columns `(header, align, cell)` where `cell(item) -> str`, rendered by
`md_table`: a new column (e.g. a predicted value beside a measured one) is one more tuple.
"""
from __future__ import annotations

from typing import Callable

from .rows import GROUP, KEY, reason

Column = tuple[str, str, Callable]  # (header, "l" or "r", cell(item) -> str)


def md_table(columns: list[Column], items) -> str:
    """A Markdown table: one header row, one alignment row, one row per item."""
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731 - a cell must stay one cell
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for _, a, _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(fn(it)) for _, _, fn in columns) + " |" for it in items]
    return "\n".join(lines)


def fmt(v, spec="{:.3g}", none="-") -> str:
    return none if v is None else spec.format(v)


def ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _spread(r) -> str:
    return f"{ms(r['p20_ms'])}-{ms(r['p80_ms'])}" if r["median_ms"] else "-"


ROW_COLUMNS: list[Column] = [
    ("suite", "l", lambda r: r["suite"]), ("what", "l", lambda r: r["what"]), ("shape", "l", lambda r: r["shape"]),
    ("dtype", "l", lambda r: r["dtype"]),
    ("provider", "l", lambda r: r["provider"] + (" (baseline)" if r["is_baseline"] else "")),
    ("median ms", "r", lambda r: ms(r["median_ms"])), ("p20-p80 ms", "r", _spread),
    ("n", "r", lambda r: r["n"] or "-"), ("peak MiB", "r", lambda r: fmt(r["peak_mib"], "{:.1f}")),
    ("speed-up", "r", lambda r: fmt(r["speedup"], "{:.2f}x")), ("memory", "r", lambda r: fmt(r["mem_ratio"], "{:.2f}x")),
    ("note", "l", lambda r: reason(r["note"])),
]


def _step_cell(key):
    """A step-table cell that is blank on an unmeasured row (its reason sits in the images/s column)."""
    def cell(r):
        return STEP_CELLS[key](r) if r["median_ms"] else ""
    return cell


STEP_CELLS = {
    "step": lambda r: f"{ms(r['median_ms'])} ({ms(r['p20_ms'])}-{ms(r['p80_ms'])})",
    "split": lambda r: " / ".join(ms(r["extra"].get("phases_ms", {}).get(k)) for k in
                                  ("data", "forward", "backward", "optimizer_ema")),
    "peak": lambda r: (f"{r['peak_mib']:.0f} ({r['extra']['state_mib']:.0f} + {r['extra']['step_mib']:.0f})"
                       if r["peak_mib"] is not None else "-"),
    "gflop": lambda r: f"{r['extra']['gflop_per_step']:.1f}",
    "tflops": lambda r: f"{r['extra']['achieved_tflops']:.3f}",
    "mfu": lambda r: fmt(r["extra"].get("mfu"), "{:.1%}"),
    "speedup": lambda r: fmt(r["speedup"], "{:.2f}x"),
    "memory": lambda r: fmt(r["mem_ratio"], "{:.2f}x"),
}

STEP_COLUMNS: list[Column] = [
    ("preset", "l", lambda r: r["extra"].get("preset", r["what"])), ("precision", "l", lambda r: r["dtype"]),
    ("batch", "r", lambda r: r["extra"].get("batch", "-")), ("provider", "l", lambda r: r["provider"]),
    ("images/s", "r", lambda r: f"{r['extra']['images_per_s']:.2f}" if r["median_ms"] else reason(r["note"])),
    ("step ms (p20-p80)", "r", _step_cell("step")), ("data / fwd / bwd / opt+EMA ms", "l", _step_cell("split")),
    ("peak MiB (state + step)", "r", _step_cell("peak")), ("GFLOP/step", "r", _step_cell("gflop")),
    ("TFLOP/s", "r", _step_cell("tflops")), ("MFU", "r", _step_cell("mfu")),
    ("speed-up", "r", _step_cell("speedup")), ("memory", "r", _step_cell("memory")),
]


def rows_table(rows: list[dict]) -> str:
    return md_table(ROW_COLUMNS, rows)


def step_table(rows: list[dict]) -> str:
    return md_table(STEP_COLUMNS, rows)


def _pct(v):
    return "?" if v is None else f"{v:.0%}"


def machine_line(m: dict) -> str:
    gpu = m.get("gpu") or "no GPU"
    peaks = ", ".join(f"{k} {v['tflops'] * 1e3:.1f} GFLOP/s" for k, v in m.get("matmul_peak", {}).items())
    peaks = peaks or "not measured (only the step suite measures it, for MFU)"
    ver = lambda v: v or "not installed"  # noqa: E731
    bf16 = {"none": "no native bf16 (no AMX / AVX512-BF16)"}.get(m["cpu_bf16"], m["cpu_bf16"])
    return (f"Machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, CPU bf16: {bf16}), "
            f"{gpu}; measured matmul peak: {peaks}. torch {m['torch']}, triton {ver(m['triton'])}, "
            f"DALI {ver(m['dali'])}, Python {m['python']}; git {m['git']}; {m['date']}; load average "
            f"{m['loadavg_start']} at start, {m.get('loadavg_end', '?')} at end; other processes used "
            f"{_pct(m.get('other_processes_cpu'))} of the machine's CPU during the run; wall {m.get('wall_s', '?')} s.")


def budget_line(b: dict) -> str:
    """What the --budget-s allowed and what it cost: the measurements it left out, by name."""
    line = f"Budget: {b['budget_s']:.0f} s (--budget-s); measuring took {b['measure_s']:.0f} s."
    if b["skipped"]:
        line += f" Not measured for lack of budget ({len(b['skipped'])}): " + "; ".join(b["skipped"]) + "."
    return line


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    out = [f"# mcf_fast benchmark report ({', '.join(report['suites'])}, {report['device']}"
           f"{', quick' if report['quick'] else ''})", "", machine_line(report["machine"]), ""]
    if report.get("command"):
        out[2:2] = [f"`{report['command']}`", ""]
    if report.get("budget"):
        out += [budget_line(report["budget"]), ""]
    step = [r for r in rows if r["suite"] == "step"]
    other = [r for r in rows if r["suite"] not in ("step", "projection")]
    if step:
        out += ["## Training step: engine vs reference", "", step_table(step), ""]
        if report.get("step_notes"):
            out += [report["step_notes"], ""]
    if report.get("goals"):
        cols = [("goal", "l", lambda g: g["goal"]), ("target", "l", lambda g: g["target"]),
                ("measured", "l", lambda g: reason(g["measured"])), ("met", "l", lambda g: g["met"])]
        out += ["## Goals", "", md_table(cols, report["goals"]), ""]
    proj = [r for r in rows if r["suite"] == "projection"]
    if proj:
        cols = [("what", "l", lambda r: r["what"]), ("images/s (model)", "r", lambda r: f"{r['extra']['images_per_s']:.0f}"),
                ("hours per 20M-image epoch (model)", "r", lambda r: f"{r['extra']['hours_per_epoch']:.2f}"),
                ("basis", "l", lambda r: r["note"])]
        out += ["## Projection (a model from counted FLOPs, not a measurement)", "", md_table(cols, proj), ""]
    if other:
        out += ["## Kernels, masks, data", "", rows_table(other), ""]
    if report.get("baselines"):
        out += ["Baselines: " + " ".join(report["baselines"]), ""]
    out += ["Times: median and p20-p80 over the repetitions (n of them per row); speed-up = baseline "
            "median / provider median; memory = provider peak / baseline peak. " + report.get("method", "")]
    return "\n".join(out)


def headline_table(report: dict) -> str:
    """Every measured provider with a ratio against its baseline, one line each, with the baseline's time
    beside it: the table documents quote from a committed report (regenerated, never typed)."""
    base = {tuple(r[k] for k in GROUP): r for r in report["rows"] if r["is_baseline"] and r["median_ms"]}
    pairs = [(r, base[tuple(r[k] for k in GROUP)]) for r in report["rows"]
             if not r["is_baseline"] and r["speedup"] and tuple(r[k] for k in GROUP) in base]
    cols = [("what", "l", lambda p: f"{p[0]['suite']}: {p[0]['what']}"), ("shape", "l", lambda p: p[0]["shape"]),
            ("dtype", "l", lambda p: p[0]["dtype"]), ("baseline", "l", lambda p: p[1]["provider"]),
            ("baseline ms", "r", lambda p: ms(p[1]["median_ms"])), ("provider", "l", lambda p: p[0]["provider"]),
            ("ms", "r", lambda p: ms(p[0]["median_ms"])), ("speed-up", "r", lambda p: fmt(p[0]["speedup"], "{:.2f}x")),
            ("memory", "r", lambda p: fmt(p[0]["mem_ratio"], "{:.2f}x"))]
    return md_table(cols, pairs)


def compare(new: dict, old: dict) -> str:
    """Markdown table of the median change for rows present in both reports (matched on KEY)."""
    old_rows = {tuple(r[k] for k in KEY): r for r in old.get("rows", [])}
    pairs = [(r, old_rows.get(tuple(r[k] for k in KEY))) for r in new["rows"]]
    pairs = [(r, o) for r, o in pairs if o is not None and o.get("median_ms") and r["median_ms"]]
    cols = [(k, "l", (lambda k: lambda p: p[0][k])(k)) for k in KEY]
    cols += [("old ms", "r", lambda p: ms(p[1]["median_ms"])), ("new ms", "r", lambda p: ms(p[0]["median_ms"])),
             ("change", "r", lambda p: f"{(p[0]['median_ms'] / p[1]['median_ms'] - 1.0) * 100:+.1f}%")]
    m = old.get("machine", {})
    table = md_table(cols, pairs) if pairs else "(no row measured in both reports)"
    return f"## Change vs {m.get('git', '?')} ({m.get('date', '?')})\n\n{table}"


__all__ = ["md_table", "fmt", "ms", "ROW_COLUMNS", "STEP_COLUMNS", "rows_table", "step_table", "machine_line",
           "budget_line", "to_markdown", "headline_table", "compare"]
