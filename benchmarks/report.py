"""Report writers for benchmarks/run.py: rows -> report.json, report.md, PNG plots, and --compare.

A row is a dict: suite, what, shape, dtype, provider, is_baseline, median_ms, p20_ms, p80_ms,
peak_mib, speedup (baseline median / this median: > 1 is faster), mem_ratio (this peak / the
baseline's peak: < 1 is leaner), note (why a row is not measured, or what it models), extra (suite
specific: images/s, phase split, MFU...). Unmeasured rows keep median_ms = None and say why in note.
"""
from __future__ import annotations

import json
import os

KEY = ("suite", "what", "shape", "dtype", "provider")


def row(suite, what, shape, dtype, provider, *, is_baseline=False, stats=None, peak_bytes=None, note="",
        **extra) -> dict:
    """A report row; `stats` from harness.summarize (None: not measured, say why in `note`)."""
    r = {"suite": suite, "what": what, "shape": shape, "dtype": dtype, "provider": provider,
         "is_baseline": is_baseline, "median_ms": None, "p20_ms": None, "p80_ms": None, "n": 0,
         "peak_mib": None if peak_bytes is None else peak_bytes / 2**20, "speedup": None, "mem_ratio": None,
         "note": note, "extra": extra}
    if stats:
        r.update({k: stats[k] for k in ("median_ms", "p20_ms", "p80_ms", "n")})
    return r


def add_ratios(rows: list[dict]) -> None:
    """Fill speedup / mem_ratio of each measured row against the baseline row of its group
    (same suite, what, shape, dtype)."""
    base = {}
    for r in rows:
        if r["is_baseline"] and r["median_ms"]:
            base[(r["suite"], r["what"], r["shape"], r["dtype"])] = r
    for r in rows:
        b = base.get((r["suite"], r["what"], r["shape"], r["dtype"]))
        if b is None or not r["median_ms"]:
            continue
        r["speedup"] = b["median_ms"] / r["median_ms"]
        if r["peak_mib"] is not None and b["peak_mib"]:
            r["mem_ratio"] = r["peak_mib"] / b["peak_mib"]


def reason(note: str) -> str:
    """A row's note as the report prints it: 'not measured: why' -> 'not measured (why)'."""
    note = (note or "").strip()
    for head in ("not measured: ", "not measured - "):
        if note.startswith(head):
            return f"not measured ({note[len(head):].rstrip('.')})"
    return note


def label(r: dict) -> str:
    """Short chart label of a row: [suite:] what shape dtype [provider], no word said twice."""
    parts = [r["what"], r["shape"], r["dtype"]]
    if r["suite"].lower() not in r["what"].lower():
        parts.insert(0, r["suite"] + ":")
    words, seen = [], set()
    for w in " ".join(p for p in parts if p and p != "-").split():
        key = w.strip(":,()").lower()
        if key in seen:
            continue
        seen.add(key)
        words.append(w)
    return " ".join(words) + f" [{r['provider']}]"


def _f(v, fmt="{:.3g}", none="-"):
    return none if v is None else fmt.format(v)


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def rows_table(rows: list[dict]) -> str:
    lines = ["| suite | what | shape | dtype | provider | median ms | p20-p80 ms | peak MiB | speed-up | memory | note |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}" if r["median_ms"] else "-"
        prov = r["provider"] + (" (baseline)" if r["is_baseline"] else "")
        lines.append(f"| {r['suite']} | {r['what']} | {r['shape']} | {r['dtype']} | {prov} | {_ms(r['median_ms'])} | "
                     f"{spread} | {_f(r['peak_mib'], '{:.1f}')} | {_f(r['speedup'], '{:.2f}x')} | "
                     f"{_f(r['mem_ratio'], '{:.2f}x')} | {reason(r['note'])} |")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    lines = ["| preset | precision | batch | provider | images/s | step ms (p20-p80) | data / fwd / bwd / opt+EMA ms | "
             "peak MiB (state + step) | GFLOP/step | TFLOP/s | MFU | speed-up | memory |",
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["extra"]
        if not r["median_ms"]:
            lines.append(f"| {e.get('preset', r['what'])} | {r['dtype']} | {e.get('batch', '-')} | {r['provider']} | "
                         f"{reason(r['note'])} | | | | | | | | |")
            continue
        ph = e.get("phases_ms", {})
        split = " / ".join(_ms(ph.get(k)) for k in ("data", "forward", "backward", "optimizer_ema"))
        peak = f"{r['peak_mib']:.0f} ({e['state_mib']:.0f} + {e['step_mib']:.0f})" if r["peak_mib"] is not None else "-"
        lines.append(f"| {e['preset']} | {r['dtype']} | {e['batch']} | {r['provider']} | {e['images_per_s']:.2f} | "
                     f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}) | {split} | {peak} | "
                     f"{e['gflop_per_step']:.1f} | {e['achieved_tflops']:.3f} | {_f(e.get('mfu'), '{:.1%}')} | "
                     f"{_f(r['speedup'], '{:.2f}x')} | {_f(r['mem_ratio'], '{:.2f}x')} |")
    return "\n".join(lines)


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


def _pct(v):
    return "?" if v is None else f"{v:.0%}"


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    out = [f"# mcf_fast benchmark report ({', '.join(report['suites'])}, {report['device']}"
           f"{', quick' if report['quick'] else ''})", "", machine_line(report["machine"]), ""]
    step = [r for r in rows if r["suite"] == "step"]
    other = [r for r in rows if r["suite"] not in ("step", "projection")]
    if step:
        out += ["## Training step: engine vs reference", "", step_table(step), ""]
        if report.get("step_notes"):
            out += [report["step_notes"], ""]
    if report.get("goals"):
        out += ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
        out += [f"| {g['goal']} | {g['target']} | {reason(g['measured'])} | {g['met']} |" for g in report["goals"]]
        out.append("")
    proj = [r for r in rows if r["suite"] == "projection"]
    if proj:
        out += ["## Projection (a model from counted FLOPs, not a measurement)", "",
                "| what | images/s (model) | hours per 20M-image epoch (model) | basis |",
                "|---|---:|---:|---|"]
        out += [f"| {r['what']} | {r['extra']['images_per_s']:.0f} | {r['extra']['hours_per_epoch']:.2f} | {r['note']} |"
                for r in proj]
        out.append("")
    if other:
        out += ["## Kernels, masks, data", "", rows_table(other), ""]
    out += ["Times: median and p20-p80 over the repetitions (n per row in report.json); speed-up = baseline "
            "median / provider median; memory = provider peak / baseline peak. " + report.get("method", "")]
    return "\n".join(out)


def write(out_dir: str, report: dict) -> list[str]:
    """report.json, report.md and the PNG plots; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(to_markdown(report) + "\n")
    paths += plot(out_dir, report)
    return paths


RATIO_CAP = 30.0  # the chart's axis ends here; a larger ratio is drawn to the edge and labelled "off scale"
WRAP = 52  # characters per tick-label line


def ratio_bars(ax, rows: list[dict], values: list[float], xlabel: str) -> None:
    """Horizontal bars on a log axis centred at 1.0: each bar runs from 1.0 to its ratio, so a ratio
    above 1 grows right (green) and one below 1 grows left (red); the 1.0 line is drawn, every bar
    carries its value, and the axis is symmetric about 1.0 (2x and 0.5x look equally far) and ends
    at RATIO_CAP, so one 460x row cannot squash the others."""
    import math
    import textwrap

    from matplotlib.ticker import FuncFormatter, NullFormatter
    y = list(range(len(rows)))[::-1]  # first row on top
    span = min(max([abs(math.log10(v)) for v in values] + [math.log10(2.0)]) * 1.3, math.log10(RATIO_CAP))
    lo, hi = 10 ** -span, 10 ** span
    drawn = [min(max(v, lo), hi) for v in values]
    ax.barh(y, [d - 1.0 for d in drawn], left=1.0, height=0.6,
            color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="k", lw=1.0)
    for yi, v, d in zip(y, values, drawn):
        if d != v:  # off scale: the value inside the bar, at the edge
            ax.text(d / 1.05 if v > 1 else d * 1.05, yi, f"{v:.3g}x (off scale)", va="center", color="white",
                    ha="right" if v > 1 else "left", fontsize=7, fontweight="bold")
        else:
            ax.text(v * (1.04 if v >= 1 else 1 / 1.04), yi, f"{v:.2f}x", va="center",
                    ha="left" if v >= 1 else "right", fontsize=7)
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(y, ["\n".join(textwrap.wrap(label(r), WRAP)) for r in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel, fontsize=8)


def _fig_height(rows: list[dict]) -> float:
    import textwrap
    lines = sum(len(textwrap.wrap(label(r), WRAP)) for r in rows)
    return 0.16 * lines + 0.14 * len(rows) + 1.6


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    ax.set_axis_off()


def plot(out_dir: str, report: dict) -> list[str]:
    """speedups.png and memory.png (ratio charts centred at 1.0) and, when the step suite ran,
    step_phases.png (where each step's time goes). Each file is written even when nothing could
    be measured, saying why, so a run always leaves the same artefacts."""
    import matplotlib
    matplotlib.use("Agg")  # no display; set before pyplot is imported anywhere
    import matplotlib.pyplot as plt

    paths = []
    charts = (("speedups.png", "speedup", lambda v: v, "speed-up = baseline median / median (log scale)\n"
               "right of 1.0: faster than the baseline, left: slower", "mcf_fast vs baselines: time"),
              ("memory.png", "mem_ratio", lambda v: 1.0 / v, "memory saving = baseline peak / peak (log scale)\n"
               "right of 1.0: leaner than the baseline, left: heavier", "mcf_fast vs baselines: peak memory"))
    for name, key, fn, xlabel, title in charts:
        rows = [r for r in report["rows"] if r[key] and not r["is_baseline"]]
        fig, ax = plt.subplots(figsize=(11, _fig_height(rows)))
        if rows:
            ratio_bars(ax, rows, [fn(r[key]) for r in rows], xlabel)
        else:
            _empty(ax, f"not measured (no row of this run has a {key.replace('_', ' ')} against a baseline; "
                       "see report.md)")
        ax.set_title(f"{title} ({report['device']}{', quick run' if report['quick'] else ''})", fontsize=10)
        fig.tight_layout(pad=1.5)
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    steps = [r for r in report["rows"] if r["suite"] == "step"]
    if steps:
        paths.append(_plot_phases(plt, os.path.join(out_dir, "step_phases.png"), steps))
    return paths


def _plot_phases(plt, path: str, steps: list[dict]) -> str:
    """100%-stacked bars of data / forward / backward / optimizer+EMA per measured step row."""
    step = [r for r in steps if r["median_ms"]]
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(len(step), 1) + 1.8))
    if not step:
        why = sorted({reason(r["note"]) for r in steps if r["note"]})
        _empty(ax, "No training step was measured in this run:\n" + "\n".join(why[:4]))
    else:  # 100%-stacked: where each step's time goes (a log axis would distort stacked bars)
        y = list(range(len(step)))[::-1]
        left = [0.0] * len(step)
        for k, c in zip(("data", "forward", "backward", "optimizer_ema"), ("tab:gray", "tab:blue", "tab:orange", "tab:green")):
            vals = [100 * r["extra"]["phases_ms"].get(k, 0.0) / max(sum(r["extra"]["phases_ms"].values()), 1e-9)
                    for r in step]
            ax.barh(y, vals, left=left, color=c, label=k.replace("optimizer_ema", "optimizer + EMA"), height=0.6)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_yticks(y, [f"{r['extra']['preset']} {r['dtype']} batch {r['extra']['batch']} [{r['provider']}]: "
                          f"{r['median_ms'] / 1e3:.2f} s/step" for r in step], fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the step (%, median of each phase); label: median step time")
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        ax.set_title("where each training step's time goes", fontsize=10, pad=22)
    fig.tight_layout(pad=1.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(new: dict, old: dict) -> str:
    """Markdown table of the median change for rows present in both reports (matched on KEY)."""
    old_rows = {tuple(r[k] for k in KEY): r for r in old.get("rows", [])}
    lines = [f"## Change vs {old.get('machine', {}).get('git', '?')} ({old.get('machine', {}).get('date', '?')})", "",
             "| suite | what | shape | dtype | provider | old ms | new ms | change |", "|---|---|---|---|---|---:|---:|---:|"]
    n = 0
    for r in new["rows"]:
        o = old_rows.get(tuple(r[k] for k in KEY))
        if o is None or not o.get("median_ms") or not r["median_ms"]:
            continue
        n += 1
        ch = (r["median_ms"] / o["median_ms"] - 1.0) * 100
        lines.append(f"| {r['suite']} | {r['what']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                     f"{_ms(o['median_ms'])} | {_ms(r['median_ms'])} | {ch:+.1f}% |")
    if n == 0:
        lines.append("| (no row measured in both reports) | | | | | | | |")
    return "\n".join(lines)


__all__ = ["KEY", "row", "add_ratios", "reason", "label", "rows_table", "step_table", "to_markdown", "write", "plot",
           "ratio_bars", "compare"]
