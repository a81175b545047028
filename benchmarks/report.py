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
                     f"{_f(r['mem_ratio'], '{:.2f}x')} | {r['note']} |")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    lines = ["| preset | precision | batch | provider | images/s | step ms (p20-p80) | data / fwd / bwd / opt+EMA ms | "
             "peak MiB (state + step) | GFLOP/step | TFLOP/s | MFU | speed-up | memory |",
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["extra"]
        if not r["median_ms"]:
            lines.append(f"| {e.get('preset', r['what'])} | {r['dtype']} | {e.get('batch', '-')} | {r['provider']} | "
                         f"{r['note']} | | | | | | | | |")
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
    return (f"Machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, CPU bf16: {m['cpu_bf16']}), "
            f"{gpu}; measured matmul peak: {peaks or '-'}. torch {m['torch']}, triton {m['triton']}, "
            f"DALI {m['dali']}, Python {m['python']}; git {m['git']}; {m['date']}; load average "
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
        out += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['met']} |" for g in report["goals"]]
        out.append("")
    proj = [r for r in rows if r["suite"] == "projection"]
    if proj:
        out += ["## Projection (model, not measured)", "", "| what | images/s | hours per 20M-image epoch | basis |",
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


def plot(out_dir: str, report: dict) -> list[str]:
    """speedups.png (every measured non-baseline row) and step_phases.png (ms per phase)."""
    import matplotlib
    matplotlib.use("Agg")  # no display; set before pyplot is imported anywhere
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in report["rows"] if r["speedup"] and not r["is_baseline"]]
    fig, ax = plt.subplots(figsize=(9, 0.35 * max(len(rows), 1) + 1.5))
    if rows:
        labels = [f"{r['suite']}: {r['what']} {r['shape']} {r['dtype']} [{r['provider']}]" for r in rows]
        ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no measured ratios (see report.md)", ha="center", va="center")
    ax.set_xlabel("speed-up vs baseline (median, log scale)")
    ax.set_title(f"mcf_fast vs baselines ({report['device']})")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speedups.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    step = [r for r in report["rows"] if r["suite"] == "step" and r["median_ms"]]
    if step:  # 100%-stacked: where each step's time goes (a log axis would distort stacked bars)
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(step) + 1.6))
        left = [0.0] * len(step)
        for k, c in zip(("data", "forward", "backward", "optimizer_ema"), ("tab:gray", "tab:blue", "tab:orange", "tab:green")):
            vals = [100 * r["extra"]["phases_ms"].get(k, 0.0) / max(sum(r["extra"]["phases_ms"].values()), 1e-9)
                    for r in step]
            ax.barh(range(len(step)), vals, left=left, color=c, label=k)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_yticks(range(len(step)), [f"{r['extra']['preset']} {r['dtype']} b{r['extra']['batch']} [{r['provider']}] "
                                         f"{r['median_ms'] / 1e3:.2f} s" for r in step], fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the step (%, medians per phase); label: median step time")
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "step_phases.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


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


__all__ = ["KEY", "row", "add_ratios", "rows_table", "step_table", "to_markdown", "write", "plot", "compare"]
