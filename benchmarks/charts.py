"""The report's PNG charts: speedups.png and memory.png (each ratio a bar from 1.0 on a log axis centred
at 1.0) and step_phases.png (where each training step's time goes). Every chart is written even when
nothing could be measured, saying why, so a run always leaves the same files."""
from __future__ import annotations

import os

from .rows import reason


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


__all__ = ["RATIO_CAP", "label", "ratio_bars", "plot"]
