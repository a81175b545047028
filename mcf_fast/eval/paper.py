"""`python -m mcf_fast.eval paper`: both downstream tasks of the paper from one checkpoint, one table.

    python -m mcf_fast.eval paper --encoder FILE --aflw19 DIR --lapa DIR --out OUT

OUT/alignment and OUT/parsing are ordinary run folders (each resumes from its ckpt.pt); a task whose
run finished with the same configuration is not run again (OUT/<task>/done.json), so rerunning the
command after an interruption picks up where it stopped and ends with the same table. OUT/paper.md and
OUT/paper.json hold the table: this checkpoint against the MCF paper and FaRL's ep16 backbone.

Units: AFLW-19 is NME_diag on the full test set x 100 (FaRL's scorer returns fractions; its README and
the paper print x100: FaRL ep16 0.943 = 0.00943), lower is better. LaPa is the mean F1 over the 10
non-background classes, hair included (face_parsing/scorers/lapa.yaml: compute_fg_mean, bg_label_name
background), x 100, higher is better.
"""
from __future__ import annotations

import argparse
import json
import math
import os

from .config import EvalConfig

# The MCF paper's table and FaRL's README ("Performance": FaRL-Base-Patch16-LAIONFace20M-ep16, Paper column).
REFERENCE = {"MCF paper": (0.932, 93.96), "FaRL ep16 (FaRL README)": (0.943, 93.88)}
# FaRL's epochs (trainers/aflw19_farl.yaml max_epoches 150, trainers/lapa_farl.yaml 300) and global batch
# (train_*_448_refinebb.yaml: batch_size 5 per GPU on FaRL's 8 GPUs).
FARL_EPOCHS = {"alignment": 150, "parsing": 300}
FARL_BATCH, FARL_INPUT = 40, 448
SHARED = ("encoder", "arch", "img_size", "batch_size", "eval_batch_size", "workers", "device", "seed",
          "freeze_backbone", "head_width", "max_test", "log_every", "ckpt_every", "stop_after", "progress")


def add_paper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="encoder.safetensors (or its folder), or 'random' with --arch")
    p.add_argument("--aflw19", required=True, help="AFLW-19 folder (AFLWinfo_release.mat + data/flickr/)")
    p.add_argument("--lapa", required=True, help="LaPa folder (train/, val/, test/ with images, labels, landmarks)")
    p.add_argument("--out", required=True, help="output folder: alignment/, parsing/, paper.md, paper.json")
    p.add_argument("--protocol", default="farl", choices=("farl", "simple"),
                   help="farl = FaRL's downstream protocol (default); simple = square-crop / resize-whole")
    p.add_argument("--arch", default="", help="architecture for --encoder random (preset or encoder.json)")
    p.add_argument("--img-size", type=int, default=FARL_INPUT, help="network input (FaRL: 448; 0 = the encoder's)")
    p.add_argument("--batch-size", type=int, default=FARL_BATCH, help="batch (FaRL: 5 per GPU x 8 = 40)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="steps per task; 0 = FaRL's epochs (AFLW 150, LaPa 300) of the train set at --batch-size")
    p.add_argument("--train-count", type=int, default=0, help="AFLW-19 faces that train (0 = the set's rule)")
    p.add_argument("--max-test", type=int, default=0, help="score only the first N test images (0 = all)")
    p.add_argument("--head-width", type=int, default=0, help="head channels (0 = the protocol's; FaRL 768)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-batch-size", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=0, help="stop each task after N steps (tests of resuming)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _configs(a: argparse.Namespace) -> dict[str, EvalConfig]:
    from .datasets import read_aflw19, read_lapa
    shared = {k: getattr(a, k) for k in SHARED}
    out = {}
    for task, data in (("alignment", a.aflw19), ("parsing", a.lapa)):
        protocol = a.protocol if a.protocol == "farl" else ("square-crop" if task == "alignment" else "resize-whole")
        steps = a.max_steps
        if steps <= 0:
            n = (len(read_aflw19(data, "train", a.train_count or None, check_images=False)) if task == "alignment"
                 else len(read_lapa(data, "train")))
            steps = FARL_EPOCHS[task] * math.ceil(n / a.batch_size)
        out[task] = EvalConfig(task=task, data=data, out=os.path.join(a.out, task), protocol=protocol,
                               max_steps=steps, train_count=a.train_count if task == "alignment" else 0,
                               **shared).validate()
    return out


def _done(cfg: EvalConfig) -> dict | None:
    """The finished run's metrics when OUT/<task>/done.json records this very configuration."""
    path = os.path.join(cfg.out, "done.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done["metrics"] if done.get("fingerprint") == cfg.resolved().fingerprint() else None


def run_paper(a: argparse.Namespace) -> dict:
    """Both tasks (skipping finished ones), then the table; returns paper.json's content."""
    from .train import _atomic_json, run
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for task, cfg in _configs(a).items():
        m = _done(cfg)
        if m is None:
            m = run(cfg)
            if "stopped_at" in m:
                return {"stopped_at": m["stopped_at"], "task": task}
            _atomic_json(os.path.join(cfg.out, "done.json"), {"fingerprint": cfg.resolved().fingerprint(),
                                                              "metrics": m})
        results[task] = m
    table = {"encoder": a.encoder, "protocol": a.protocol, "units": "NME_diag x100 (lower better), F1 x100",
             "this": (100 * results["alignment"]["nme_diag"], 100 * results["parsing"]["f1_mean"]),
             "reference": REFERENCE, "runs": {t: r["run"] for t, r in results.items()},
             "test_faces": {t: r["num_images"] for t, r in results.items()}}
    _atomic_json(os.path.join(a.out, "paper.json"), table)
    with open(os.path.join(a.out, "paper.md"), "w") as f:
        f.write(paper_markdown(table))
    return table


def paper_markdown(t: dict) -> str:
    ra, rp = t["runs"]["alignment"], t["runs"]["parsing"]
    proto = ("FaRL's downstream protocol (AFLW-19: the box warped onto the input; LaPa: five of the 106 landmarks "
             "fitted to FaRL's template, tanh warp 0.8, predictions warped back and scored at the original "
             "resolution; FaRL's UPerHead, losses, AdamW settings, step schedule, EMA 0.999, augmentations)"
             if t["protocol"] == "farl" else "the simple protocol (AFLW-19 square crop 1.2 x box; LaPa whole image "
             "resized; light FPN head, cosine schedule)")
    rows = [("this checkpoint", *t["this"])] + [(k, *v) for k, v in t["reference"].items()]
    lines = ["# Downstream: this checkpoint vs the paper", "",
             "| encoder | AFLW-19 full, NME_diag x100 (lower better) | LaPa, mean F1 x100 (higher better) |",
             "| --- | ---: | ---: |"]
    lines += [f"| {n} | {a:.3f} | {p:.2f} |" for n, a, p in rows]
    lines += ["", f"- encoder: {t['encoder']}", f"- protocol: {proto}",
              f"- AFLW-19: {ra['train_images']} train faces, {t['test_faces']['alignment']} test faces; "
              f"{ra['steps']} steps x batch {ra['batch_size']} at {ra['img_size']} px",
              f"- LaPa: {rp['train_images']} train images, {t['test_faces']['parsing']} test images; "
              f"{rp['steps']} steps x batch {rp['batch_size']} at {rp['img_size']} px",
              "- references: the MCF paper's table; FaRL README, FaRL-Base-Patch16-LAIONFace20M-ep16 (Paper column).",
              "- the numbers compare only on the real AFLW-19 (20,000 / 4,386) and LaPa (18,176 / 2,000) splits.", ""]
    return "\n".join(lines)
