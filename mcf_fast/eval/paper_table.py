"""paper.md / paper.json: seeds aggregated (mean +- sd), last and best labelled, against the MCF paper and FaRL.

Units: AFLW-19 is NME_diag on the full test set x 100 (FaRL's scorer returns fractions; its README and
the paper print x100: FaRL ep16 0.943 = 0.00943), lower is better. LaPa is the mean F1 over the 10
non-background classes, hair included (face_parsing/scorers/lapa.yaml: compute_fg_mean, bg_label_name
background), x 100, higher is better.
"""
from __future__ import annotations

import math
import statistics

from .results import fmt

TASKS = ("alignment", "parsing")
# (label, AFLW-19 NME_diag x100, LaPa F1 x100). The MCF paper's table; FaRL's README ("Performance",
# FaRL-Base-Patch16-LAIONFace20M-ep16, Paper column), which are the best test epochs; and the last epochs of
# the same runs (FaRL's logs/paper/face_alignment.train_aflw19_farl-b-ep16_448_refinebb/eval.aflw19_test_0.tsv
# epoch 150: diag 0.010004; logs/paper/face_parsing.train_lapa_farl-b-ep16_448_refinebb/eval.lapa_test_0.tsv
# epoch 300: fg_mean 0.938146).
REFERENCE = {"MCF paper (states FaRL's protocol)": (0.932, 93.96),
             "FaRL ep16 (FaRL README: best test epoch)": (0.943, 93.88),
             "FaRL ep16, last epoch (FaRL's logs)": (1.000, 93.81)}
CHOICE_NAMES = {"auc_grid": "AUC/FR grid", "precision": "precision", "head_init": "head init",
                "ema_warmup": "EMA warm-up", "warp_frame": "tanh-warp frame", "absent_class": "absent class",
                "eval_every": "scoring schedule"}


def _headline(m: dict, which: str) -> tuple[float | None, int | None]:
    """(headline x 100, step) of a task's `last` or `best` evaluation; None when it has none."""
    key, _ = m["headline"]
    rec = m.get(which)
    if not rec or rec.get(key) is None:
        return None, rec["step"] if rec else None
    return 100.0 * rec[key], rec["step"]


def aggregate(results: dict[int, dict[str, dict]]) -> dict:
    """{which: {task: {mean, sd, runs: [{seed, value, step}]}}} over the seeds; NaN when a run has none."""
    out = {}
    for which in ("best", "last"):
        out[which] = {}
        for task in TASKS:
            runs = []
            for seed, per_task in results.items():
                v, step = _headline(per_task[task], which)
                runs.append({"seed": seed, "value": v, "step": step})
            vals = [r["value"] for r in runs]
            ok = all(v is not None for v in vals)
            mean = statistics.fmean(vals) if ok else math.nan
            sd = statistics.stdev(vals) if ok and len(vals) > 1 else math.nan
            out[which][task] = {"mean": mean, "sd": sd, "runs": runs}
    return out


def _cell(agg: dict, digits: int) -> str:
    n = len(agg["runs"])
    if n == 1 or math.isnan(agg["sd"]):
        return fmt(agg["mean"], 1, digits)
    return f"{fmt(agg['mean'], 1, digits)} ± {fmt(agg['sd'], 1, digits)}"


def protocol_line(t: dict) -> str:
    if t["protocol"] != "farl":
        return ("the simple protocol (AFLW-19 square crop 1.2 x box; LaPa whole image resized; light FPN head, "
                "cosine schedule)")
    return ("FaRL's downstream protocol (AFLW-19: the box warped onto the input; LaPa: five of the 106 landmarks "
            "fitted to FaRL's template, tanh warp 0.8, predictions warped back and scored at the original "
            "resolution; FaRL's UPerHead, losses, AdamW settings, step schedule, EMA 0.999, augmentations)")


def choices_line(choices: dict) -> str:
    """Where the computation is FaRL's and where it is ours, item by item (docs/evaluation.md)."""
    def shown(v):
        return ("on" if v else "off") if isinstance(v, bool) else v
    parts = [f"{CHOICE_NAMES[k]} {shown(v)} ({whose})" for k, (v, whose) in choices.items()]
    mine = [CHOICE_NAMES[k] for k, (_, whose) in choices.items() if whose != "FaRL"]
    head = "FaRL's computation in every item" if not mine else f"FaRL's computation except: {', '.join(mine)}"
    return f"{head}: " + "; ".join(parts) + "; inter-pupil NME reported"


def paper_markdown(t: dict) -> str:
    k = len(t["seeds"])
    runs = f"mean ± sd of {k} seeds" if k > 1 else f"seed {t['seeds'][0]}"
    best, last = t["rows"]["best"], t["rows"]["last"]
    lines = ["# Downstream: this checkpoint vs the paper", "",
             "| encoder | AFLW-19 full, NME_diag x100 (lower better) | LaPa, mean F1 x100 (higher better) |",
             "| --- | ---: | ---: |",
             f"| this checkpoint, best test evaluation ({runs}) | {_cell(best['alignment'], 3)} | "
             f"{_cell(best['parsing'], 2)} |",
             f"| this checkpoint, last step ({runs}) | {_cell(last['alignment'], 3)} | {_cell(last['parsing'], 2)} |"]
    lines += [f"| {n} | {a:.3f} | {p:.2f} |" for n, (a, p) in t["reference"].items()]
    lines += ["", "**Which row stands beside FaRL's and MCF's numbers: best.** FaRL's README numbers are "
              "best-of-test-epochs: FaRL scores the test set after every epoch and reports the best of those "
              "scores (AFLW-19 0.943 is epoch 15 of 150, LaPa 93.88 epoch 150 of 300; the last epochs of the same "
              "runs give 1.000 and 93.81). The MCF paper states FaRL's protocol. This checkpoint's 'best' row is "
              f"chosen the same way, over its own test evaluations ({t['eval_every']}); 'last' is the score after "
              "the final step, with no choice made on the test set.", "", "## Each run", "",
              "| seed | AFLW-19 last (step) | AFLW-19 best (step) | LaPa last (step) | LaPa best (step) |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for i, seed in enumerate(t["seeds"]):
        cells = []
        for task, digits in (("alignment", 3), ("parsing", 2)):
            for which in ("last", "best"):
                r = t["rows"][which][task]["runs"][i]
                cells.append(f"{fmt(r['value'], 1, digits)} ({r['step']})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    ra, rp = t["runs"]["alignment"], t["runs"]["parsing"]
    lines += ["", f"- encoder: {t['encoder']} (sha256 {t['encoder_sha256'][:16]}...)",
              f"- protocol: {protocol_line(t)}",
              f"- computation: {choices_line(t['choices'])}",
              f"- AFLW-19: {ra['train_images']} train faces, {t['test_faces']['alignment']} test faces; "
              f"{ra['steps']} steps x batch {ra['batch_size']} at {ra['img_size']} px on {ra['device']}",
              f"- LaPa: {rp['train_images']} train images, {t['test_faces']['parsing']} test images; "
              f"{rp['steps']} steps x batch {rp['batch_size']} at {rp['img_size']} px on {rp['device']}",
              "- references: the MCF paper's table; FaRL README, FaRL-Base-Patch16-LAIONFace20M-ep16 (Paper column); "
              "FaRL's logs/paper/ for its last epochs.",
              "- the numbers compare only on the real AFLW-19 (20,000 / 4,386) and LaPa (18,176 / 2,000) splits.",
              f"- command: `{t['command']}`", ""]
    return "\n".join(lines)


def card_block(t: dict) -> str:
    """The paper's result as the encoder's MODEL_CARD.md records it."""
    best, last = t["rows"]["best"], t["rows"]["last"]
    k = len(t["seeds"])
    return "\n".join([
        f"- **paper** ({t['protocol']} protocol, {k} seed{'s' if k > 1 else ''}): AFLW-19 NME_diag x100 best "
        f"{_cell(best['alignment'], 3)}, last {_cell(last['alignment'], 3)}; LaPa mean F1 x100 best "
        f"{_cell(best['parsing'], 2)}, last {_cell(last['parsing'], 2)} (FaRL's README: 0.943 / 93.88, best "
        f"test epochs). Table: {t['out']}/paper.md",
        f"  - command: `{t['command']}`"])


__all__ = ["REFERENCE", "aggregate", "card_block", "paper_markdown"]
