"""What a finished downstream run writes: metrics.json, metrics.md, predictions.png, the final metrics row,
and its scores in the encoder's MODEL_CARD.md."""
from __future__ import annotations

import logging
import math
import os

from .config import EvalConfig, command_line
from .evaluation import EvalHistory
from .metrics import LAPA_CLASSES
from .runlog import append_row, atomic_json
from .viz import alignment_sheet, parsing_sheet

log = logging.getLogger(__name__)
ALIGNMENT_KEYS = ["nme_diag", "nme_box", "nme_inter_ocular", "nme_inter_pupil", "auc_box_7", "fr_box_7",
                  "nme_diag_frontal", "nme_box_frontal", "nme_inter_ocular_frontal", "nme_inter_pupil_frontal"]


def fmt(v, scale: float = 1.0, digits: int = 4) -> str:
    """A score for a table: NaN / missing as 'NaN' or 'n/a' (FaRL's rule makes a mean NaN on purpose)."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v * scale:.{digits}f}"
    return str(v)


def metrics_markdown(task: str, metrics: dict, info: dict, history: EvalHistory) -> str:
    """metrics.md: the last scores (fractions and the paper's x100), the best evaluation, the curve, the run."""
    lines = [f"# Downstream {task}", ""]
    if task == "alignment":
        keys = ALIGNMENT_KEYS
        lines += ["Lower is better for NME and FR, higher for AUC. Paper (MCF, AFLW-19 full): NME_diag x100 = 0.932.", ""]
    else:
        keys = ["f1_mean"] + [f"f1_{n}" for n in LAPA_CLASSES]
        lines += ["Mean F1 over the 10 foreground classes (background excluded). Paper (MCF, LaPa): 93.96.", ""]
    best, last = history.best(), history.last()
    lines += [f"| metric | last (step {last['step']}) | x100 | best (step {best['step'] if best else '-'}) | x100 |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for k in keys:
        if k in metrics:
            b = best.get(k) if best else None
            lines.append(f"| {k} | {fmt(metrics[k])} | {fmt(metrics[k], 100, 3)} | {fmt(b)} | {fmt(b, 100, 3)} |")
    key = history.key
    lines += ["", f"Scored on {metrics.get('num_images')} test images ({info['eval_split']}), at the original image "
                  f"resolution, {len(history.records)} times ({info.get('eval_every')}). 'best' is the best "
                  f"{key} of those evaluations (how FaRL reports its numbers: best-of-test-epochs); 'last' is the "
                  "score after the final step.", "", "## Curve", "",
              "| step | epoch | " + key + " |", "| ---: | ---: | ---: |"]
    lines += [f"| {r['step']} | {r['epoch']} | {fmt(r.get(key))} |" for r in history.records]
    lines += ["", "## Run", ""]
    for k in ("encoder", "encoder_sha256", "arch", "protocol", "choices", "warp_factor", "img_size", "freeze_backbone",
              "steps", "batch_size", "lr", "backbone_lr_scale", "layer_decay", "schedule", "ema_decay", "head_width",
              "seed", "train_images", "train_seconds", "device", "command"):
        if k in info:
            lines.append(f"- {k}: {info[k]}")
    lines += ["", "![predictions](predictions.png)", ""]
    return "\n".join(lines)


def _card_block(cfg: EvalConfig, out: dict) -> str:
    key, better = out["headline"]
    last, best = out["last"], out["best"]
    return "\n".join([
        f"- **{cfg.task}** ({cfg.protocol} protocol, {out['num_images']} test images, {cfg.eval_split}): "
        f"{key} last {fmt(last.get(key))} (step {last['step']}), best {fmt(best.get(key) if best else None)} "
        f"(step {best['step'] if best else '-'}); {better} is better. Run folder: {os.path.abspath(cfg.out)}",
        f"  - command: `{out['run']['command']}`"])


def write_results(cfg: EvalConfig, metrics: dict, viz, run_info: dict, history: EvalHistory) -> dict:
    """Write the run's result files; returns metrics.json's content (the last scores at the top level)."""
    run_info = {**run_info, "command": command_line(cfg)}
    best, last = history.best(), history.last()
    out = {"task": cfg.task, **metrics, "units": "fraction", "last": last, "best": best,
           "headline": [history.key, history.better], "evaluations": history.curve(),
           "run": run_info}
    atomic_json(os.path.join(cfg.out, "metrics.json"), out)
    with open(os.path.join(cfg.out, "metrics.md"), "w") as f:
        f.write(metrics_markdown(cfg.task, metrics, run_info, history))
    (alignment_sheet if cfg.task == "alignment" else parsing_sheet)(viz, os.path.join(cfg.out, "predictions.png"))
    append_row(os.path.join(cfg.out, "metrics.jsonl"),
               {"kind": "final", "final": True, "step": cfg.max_steps, "last": last, "best": best,
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
    k = history.key
    log.info("%s: last %s %s (step %d), best %s (step %s)", cfg.task, k, fmt(last.get(k)), last["step"],
             fmt(best.get(k) if best else None), best["step"] if best else "-")
    if cfg.update_card and cfg.encoder != "random":
        from mcf_fast.model.card import add_eval_scores
        add_eval_scores(cfg.encoder.partition("#")[0], f"eval {os.path.abspath(cfg.out)}", _card_block(cfg, out),
                        cfg.encoder_digest)
    return out
