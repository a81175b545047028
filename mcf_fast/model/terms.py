"""The training loss as named terms, each with its weight.

`MCFModel.forward` does the work every term shares once (the online encoder on the visible patches,
the decoder's image), then computes each entry of `model.loss_terms`, a mapping name -> `LossTerm`;
the loss is the sum of weight x value in the mapping's order. The step, the metrics window and
metrics.jsonl iterate over the names, so a new term is one function and one entry in `default_terms`
(or, for an experiment, one assignment to `model.loss_terms[name]`): it is summed, averaged and logged
as `loss_<name>` with no other edit. A term whose weight is 0 is not in the mapping: it costs nothing
and is not logged.

The standard terms (docs/METHOD.md):
  perceptual   the frozen teacher's token-normalised feature maps of the decoder's image vs the real one
  pixel        MAE's pixel loss on the removed patches, when there is no teacher (`--model.teacher pixel`)
  contrastive  MoCo v3 InfoNCE between the online view's query and the target view's key, times 2T
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import ops
from .heads import all_gather_nograd

RECONSTRUCTION = ("perceptual", "pixel")  # the names the decoder's term goes by, by teacher


@dataclass
class ForwardState:
    """What the forward pass computed once, for every term to read."""
    imgs: torch.Tensor             # [N, 3, H, W], normalised
    ids_keep: torch.Tensor         # [N, K] online view's visible patches
    ids_restore: torch.Tensor      # [N, L]
    mask: torch.Tensor             # [N, L] bool, True = removed
    ids_keep_target: torch.Tensor  # [N, K] target view's visible patches
    rank: int
    local_negatives: bool
    latent: torch.Tensor           # online encoder output [N, 1 + K, D]
    pred_patches: torch.Tensor     # decoder output [N, L, p*p*3]
    pred: torch.Tensor             # decoder image [N, 3, H, W]


@dataclass(frozen=True)
class LossTerm:
    """One term: `compute(model, state)` -> a 0-dim float tensor (with its graph), counted `weight` times."""
    weight: float
    compute: Callable[[torch.nn.Module, ForwardState], torch.Tensor]


def reconstruction_term(model, s: ForwardState) -> torch.Tensor:
    """The teacher kind's loss on the decoder's output (model/teacher.py, TEACHERS): the frozen teacher's
    feature-map distance between the decoder's image and the real one ('perceptual'), or MAE's pixel error
    on the removed patches ('pixel')."""
    return model.teacher_loss(s.imgs, s.pred, s.pred_patches, s.mask)


def contrastive_term(model, s: ForwardState) -> torch.Tensor:
    """InfoNCE of q = predictor(projector(online CLS)) against the target view's keys, scaled by 2T."""
    q = model.predictor(model.projector(s.latent[:, 0]))
    with torch.no_grad():
        k = model.target_projector(model.encode(model.target_encoder, s.imgs, s.ids_keep_target)[:, 0])
        # local_negatives: this rank's keys only (labels 0..N-1), as a per-GPU reference run saw.
        k_all = k.float() if s.local_negatives else all_gather_nograd(k.float())
    offset = 0 if s.local_negatives else q.shape[0] * s.rank
    return ops.info_nce(q.float(), k_all, model.temperature, label_offset=offset, scale=2 * model.temperature)


def default_terms(model) -> dict[str, LossTerm]:
    """The model's terms from its teacher and weights: the decoder's term, named by the teacher kind
    ('perceptual' with a teacher, 'pixel' without one), then 'contrastive'; terms of weight 0 are left out."""
    table = {model.teacher_entry.term: LossTerm(float(model.perceptual_weight), reconstruction_term),
             "contrastive": LossTerm(float(model.contrastive_weight), contrastive_term)}
    terms = {name: t for name, t in table.items() if t.weight != 0}
    if not terms:
        raise ValueError("--model.perceptual_weight and --model.contrastive_weight are both 0: the loss would be "
                         "0 and nothing would train; set at least one above 0")
    return terms


def weighted_sum(values: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum of weights[n] * values[n] in the mapping's order (w0 * t0 + w1 * t1 + ..., the order the
    reference statement adds them in)."""
    total = None
    for name, v in values.items():
        part = weights[name] * v
        total = part if total is None else total + part
    return total


class NamedTerms:
    """Read access by the two classic attribute names, for code written before terms had names:
    `loss_perceptual` is the decoder's term (perceptual, or pixel without a teacher), `loss_contrastive`
    the contrastive one; None when that term is not computed (weight 0). New code reads `terms[name]`."""
    terms: dict

    @property
    def loss_perceptual(self):
        return next((self.terms[n] for n in RECONSTRUCTION if n in self.terms), None)

    @property
    def loss_contrastive(self):
        return self.terms.get("contrastive")


__all__ = ["LossTerm", "ForwardState", "default_terms", "weighted_sum", "NamedTerms", "reconstruction_term",
           "contrastive_term", "RECONSTRUCTION"]
