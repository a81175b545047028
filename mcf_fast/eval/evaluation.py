"""Scoring during fine-tuning: on which weights, how often, and which score is reported.

FaRL scores the test split after every epoch (blueprint `ml/trainer.py`: `eval_interval`, 1 in
trainers/*_farl.yaml) on its EMA network (`network_name_eval: main_ema`), and its README numbers are
the best of those test evaluations (AFLW-19 0.943 is epoch 15 of 150, LaPa 93.88 epoch 150 of 300;
the last epochs give 1.000 and 93.81: FaRL's logs/paper/*/eval.*_test_0.tsv). A run here keeps every
evaluation, and reports both the **last** (after the final step: no selection on the test set) and the
**best** (FaRL's way), each with its step.
"""
from __future__ import annotations

import contextlib
import math

import torch

# The score that ranks evaluations, and which way is better.
HEADLINE = {"alignment": ("nme_diag", "lower"), "parsing": ("f1_mean", "higher")}


@contextlib.contextmanager
def scored_weights(model: torch.nn.Module, ema_state: dict | None):
    """The model in eval mode holding the weights that are scored (the EMA's when there is one), put back
    to the training weights and mode afterwards: scoring mid-run does not change what is trained."""
    was_training = model.training
    saved = None
    if ema_state is not None:
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema_state)
    model.eval()
    try:
        yield model
    finally:
        if saved is not None:
            model.load_state_dict(saved)
        model.train(was_training)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scalar_scores(metrics: dict) -> dict:
    """The numeric scores of an evaluation (NaN kept as None so records stay plain JSON)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = v if not isinstance(v, float) or math.isfinite(v) else None
    return out


class EvalHistory:
    """Every evaluation of one run, in step order: {step, epoch, scores...} records (checkpointed)."""

    def __init__(self, task: str, records: list[dict] | None = None):
        self.task = task
        self.key, self.better = HEADLINE[task]
        self.records = [dict(r) for r in (records or [])]

    def add(self, step: int, epoch: float, metrics: dict) -> dict:
        """Record one evaluation; a second one at the same step replaces the first."""
        rec = {"step": int(step), "epoch": round(float(epoch), 4), **scalar_scores(metrics)}
        self.records = [r for r in self.records if r["step"] != rec["step"]] + [rec]
        self.records.sort(key=lambda r: r["step"])
        return rec

    def last(self) -> dict | None:
        return self.records[-1] if self.records else None

    def best(self) -> dict | None:
        """The evaluation with the best finite headline score (the earliest on a tie); None when none is."""
        ok = [r for r in self.records if _finite(r.get(self.key))]
        if not ok:
            return None
        sign = 1.0 if self.better == "lower" else -1.0
        return min(ok, key=lambda r: (sign * r[self.key], r["step"]))

    def curve(self) -> list[tuple[int, float | None]]:
        """(step, headline) of every evaluation: the curve behind best and last."""
        return [(r["step"], r.get(self.key)) for r in self.records]


def due(done: int, every: int, max_steps: int) -> bool:
    """Whether step `done` is scored inside the loop (the last step is scored after it, with pictures)."""
    return every > 0 and done % every == 0 and done < max_steps
