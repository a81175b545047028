"""Downstream metrics, scored the way FaRL's scorers do it.

Alignment (AFLW-19): per image, the mean over all 19 points of the Euclidean error divided by a unit
distance, then the mean over images. Unit distances (FaRL's face_alignment/scorers/aflw19.yaml): the
face box diagonal (`nme_diag`, the headline number), the box's sqrt(w*h) (`nme_box`), the distance
between the outer eye corners, points 6 and 11 in 0-based order (`nme_inter_ocular`), and between the
eye centres, points 7 and 10 (`nme_inter_pupil`). AUC / failure rate at 0.07 use the box-normalised
NMEs and one of two grids (`AUC_GRIDS`):
- `farl` (FaRL's face_alignment/scorer.py, AUC_FR): the CED sampled on np.arange(0, 0.07 + 1e-4, 1e-4)
  (702 points, the last one 0.0701), integrated with the Simpson rule FaRL's scipy applied to an even
  number of samples (`simps`, even='avg': the mean of Simpson-on-the-first-701 + a trapezoid on the
  last interval and a trapezoid on the first + Simpson-on-the-last-701), divided by 0.07; an image
  fails only above 0.0701.
- `closed` (ours): 701 points on [0, 0.07] exactly, plain Simpson, failures above 0.07.

Parsing (LaPa): one confusion matrix over every test pixel at the original resolution; F1 per class
from it; the mean over the 10 foreground classes (background excluded, hair included). A class absent
from both labels and predictions has no F1: `absent="nan"` makes the mean NaN, as FaRL's
face_parsing/scorer.py (F1Score: 0/0, then sum / count); `absent="skip"` (ours) leaves it out of the
mean and lists it in `classes_without_f1`.

All values are fractions (the paper prints them x100: 0.932 NME_diag means 0.00932 here).
"""
from __future__ import annotations

import math

import numpy as np
import torch

AFLW_NUM_POINTS = 19
AFLW_EYE_CORNERS = (6, 11)  # 0-based: the outer corners of the two eyes in AFLW-19's ordering
AFLW_PUPILS = (7, 10)       # 0-based: the eye centres (FaRL's scorers/aflw19.yaml inter_pupil: left 7, right 10)
AUC_GRIDS = ("farl", "closed")
ABSENT_CLASS = ("nan", "skip")
LAPA_CLASSES = ("background", "skin", "left_brow", "right_brow", "left_eye", "right_eye", "nose",
                "upper_lip", "inner_mouth", "lower_lip", "hair")


def _check_points(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"landmarks must both be [N, P, 2]; got pred {pred.shape}, gt {gt.shape}")
    return pred, gt


def box_sizes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(w*h), sqrt(w^2+h^2)) of boxes given as [N, 4] = (left, right, top, bottom)."""
    b = np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (left, right, top, bottom), got {b.shape}")
    w, h = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    if np.any(w <= 0) or np.any(h <= 0):
        bad = int(np.flatnonzero((w <= 0) | (h <= 0))[0])
        raise ValueError(f"box {bad} has non-positive width/height: {b[bad].tolist()} (expected left<right, top<bottom)")
    return np.sqrt(w * h), np.sqrt(w * w + h * h)


def per_image_nme(pred: np.ndarray, gt: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """[N] mean point error of each image divided by its unit distance."""
    pred, gt = _check_points(pred, gt)
    unit = np.asarray(unit, np.float64).reshape(-1)
    if unit.shape[0] != pred.shape[0]:
        raise ValueError(f"{unit.shape[0]} unit distances for {pred.shape[0]} images")
    if np.any(unit <= 0):
        raise ValueError("a unit distance is <= 0 (degenerate box or coincident eye corners)")
    return np.linalg.norm(pred - gt, axis=-1).mean(axis=1) / unit


def _simpson_even_avg(y: np.ndarray, x: np.ndarray) -> float:
    """Simpson's rule on an even number of samples as scipy's `simps(..., even='avg')` (scipy < 1.11, the
    version FaRL ran): Simpson needs an even number of intervals, so average (Simpson on all but the last
    sample + a trapezoid on the last interval) and (a trapezoid on the first + Simpson on the rest)."""
    from scipy.integrate import simpson
    first = simpson(y[:-1], x=x[:-1]) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    last = 0.5 * (x[1] - x[0]) * (y[1] + y[0]) + simpson(y[1:], x=x[1:])
    return float(0.5 * (first + last))


def auc_fr(nmes: np.ndarray, threshold: float = 0.07, step: float = 1e-4, grid: str = "farl") -> tuple[float, float]:
    """AUC of the cumulative error distribution up to `threshold` (normalised to 1) and failure rate, on
    FaRL's grid (`farl`) or the closed interval (`closed`); see the module docstring."""
    from scipy.integrate import simpson
    if grid not in AUC_GRIDS:
        raise ValueError(f"AUC grid must be one of {AUC_GRIDS}, got {grid!r}")
    nmes = np.sort(np.asarray(nmes, np.float64).reshape(-1))
    if nmes.size == 0:
        raise ValueError("no NMEs to score")
    if grid == "farl":
        xs = np.arange(0.0, threshold + step, step)  # float steps: ends one step past the threshold
    else:
        xs = np.linspace(0.0, threshold, int(round(threshold / step)) + 1)
    ced = np.searchsorted(nmes, xs, side="right") / nmes.size  # share of images with NME <= x
    area = _simpson_even_avg(ced, xs) if len(xs) % 2 == 0 else float(simpson(ced, x=xs))
    return area / threshold, float(1.0 - ced[-1])


def _pair_distance(gt: np.ndarray, pair: tuple[int, int], what: str) -> np.ndarray:
    a, b = pair
    if gt.shape[1] <= max(a, b):
        raise ValueError(f"{what} NME needs points {a} and {b}; landmarks have {gt.shape[1]} points")
    return np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)


def alignment_metrics(pred: np.ndarray, gt: np.ndarray, boxes: np.ndarray, auc_grid: str = "farl") -> dict[str, float]:
    """All alignment scores for predictions and ground truth in original image coordinates."""
    pred, gt = _check_points(pred, gt)
    box, diag = box_sizes(boxes)
    ocular = _pair_distance(gt, AFLW_EYE_CORNERS, "inter-ocular")
    pupil = _pair_distance(gt, AFLW_PUPILS, "inter-pupil")
    nme_box = per_image_nme(pred, gt, box)
    auc, fr = auc_fr(nme_box, 0.07, grid=auc_grid)
    return {"nme_diag": float(per_image_nme(pred, gt, diag).mean()), "nme_box": float(nme_box.mean()),
            "nme_inter_ocular": float(per_image_nme(pred, gt, ocular).mean()),
            "nme_inter_pupil": float(per_image_nme(pred, gt, pupil).mean()),
            "auc_box_7": auc, "fr_box_7": fr, "num_images": int(pred.shape[0])}


# ------------------------------------------------------------------ parsing
def update_confusion(conf: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor,
                     ignore_index: int = 255) -> torch.Tensor:
    """Add the pixels of one label map pair to conf[gt, pred] (int64 [K, K]); returns conf."""
    k = conf.shape[0]
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ in size")
    gt, pred = gt.reshape(-1).long(), pred.reshape(-1).long()
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    if gt.numel() and (int(gt.max()) >= k or int(gt.min()) < 0):
        raise ValueError(f"label values must lie in 0..{k - 1} (or {ignore_index} = ignore), got {int(gt.max())}")
    conf += torch.bincount(gt * k + pred, minlength=k * k).reshape(k, k).to(conf)
    return conf


def f1_from_confusion(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """[K] F1 per class = 2TP / (2TP + FP + FN); NaN for a class absent from labels and predictions."""
    c = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, np.float64)
    tp = np.diag(c)
    denom = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-300), np.nan)


def parsing_metrics(conf, class_names=LAPA_CLASSES, background: int = 0, absent: str = "nan") -> dict[str, float]:
    """Per-class F1 (`f1_<name>`, None when the class is absent) and `f1_mean` over the non-background
    classes: NaN if one is absent (`absent="nan"`, FaRL) or the mean of the others (`"skip"`)."""
    if absent not in ABSENT_CLASS:
        raise ValueError(f"absent-class rule must be one of {ABSENT_CLASS}, got {absent!r}")
    f1 = f1_from_confusion(conf)
    if len(f1) != len(class_names):
        raise ValueError(f"confusion matrix has {len(f1)} classes, names list {len(class_names)}")
    out = {f"f1_{n}": (None if math.isnan(v) else float(v)) for n, v in zip(class_names, f1)}
    fg = np.delete(f1, background)
    if absent == "nan":
        out["f1_mean"] = float(fg.sum() / len(fg))  # any NaN makes the mean NaN, as sum / count does
    else:
        out["f1_mean"] = float(np.nanmean(fg)) if np.any(~np.isnan(fg)) else float("nan")
    out["num_pixels"] = int(np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf).sum())
    out["classes_without_f1"] = [n for n, v in zip(class_names, f1) if math.isnan(v)]
    return out
