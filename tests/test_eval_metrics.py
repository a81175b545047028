"""Downstream metrics against hand-computed values (FaRL's scoring rules)."""
import math

import numpy as np
import pytest
import torch

from mcf_fast.eval.metrics import (
    alignment_metrics,
    auc_fr,
    box_sizes,
    f1_from_confusion,
    parsing_metrics,
    per_image_nme,
    update_confusion,
)


def _face(offset=(0.0, 0.0)):
    gt = np.zeros((19, 2))
    gt[:, 0] = np.arange(19)
    gt[11] = [10.0, 0.0]  # outer eye corners 6 and 11 are 10 - 6 = 4 apart along x
    gt[6] = [6.0, 0.0]
    return gt, gt + np.asarray(offset)


def test_nme_three_normalisations_hand_values():
    """A uniform (3, 4) error (5 px) on a 30x40 box: diag 50, sqrt(wh) = sqrt(1200), eyes 4 apart."""
    gt, pred = _face((3.0, 4.0))
    m = alignment_metrics(pred[None], gt[None], np.array([[0.0, 30.0, 0.0, 40.0]]))
    assert m["nme_diag"] == pytest.approx(5 / 50, rel=1e-12)
    assert m["nme_box"] == pytest.approx(5 / math.sqrt(1200), rel=1e-12)
    assert m["nme_inter_ocular"] == pytest.approx(5 / 4, rel=1e-12)
    assert m["fr_box_7"] == 1.0 and m["auc_box_7"] == 0.0


def test_nme_is_mean_of_per_image_means():
    """Per image: mean point error / unit; then the mean over images (not pooled over all points)."""
    gt = np.zeros((2, 19, 2))
    pred = gt.copy()
    pred[0, 0, 0] = 19.0           # image 0: one point off by 19 -> mean error 1, unit 10 -> 0.1
    pred[1, :, 1] = 2.0            # image 1: every point off by 2 -> mean error 2, unit 40 -> 0.05
    nme = per_image_nme(pred, gt, np.array([10.0, 40.0]))
    np.testing.assert_allclose(nme, [0.1, 0.05], rtol=1e-12)
    boxes = np.array([[0, 6.0, 0, 8.0], [0, 24.0, 0, 32.0]])  # diagonals 10 and 40
    gt2 = gt.copy()
    gt2[:, 11, 0] = gt2[:, 10, 0] = 1.0  # non-degenerate eye-corner and pupil distances
    pred2 = pred.copy()
    pred2[:, 11, 0] += 1.0
    pred2[:, 10, 0] += 1.0
    assert alignment_metrics(pred2, gt2, boxes)["nme_diag"] == pytest.approx(0.075, rel=1e-12)


def test_box_sizes_and_bad_boxes():
    """Boxes are (left, right, top, bottom); a non-positive side is an error naming the box."""
    box, diag = box_sizes(np.array([[10.0, 13.0, 20.0, 24.0]]))
    assert box[0] == pytest.approx(math.sqrt(12)) and diag[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="box 0"):
        box_sizes(np.array([[10.0, 10.0, 0.0, 5.0]]))


@pytest.mark.parametrize("nmes, auc, fr", [
    ([0.0, 0.0], 1.0, 0.0),                 # everything perfect
    ([0.035], 0.5, 0.0),                    # CED steps to 1 half-way
    ([0.01, 0.1], 0.5 * 0.06 / 0.07, 0.5),  # half the images never succeed
    ([0.07], 0.0, 0.0),                     # exactly at the threshold: not a failure, no area
    ([0.0701, 0.2], 0.0, 1.0),
])
def test_auc_and_failure_rate(nmes, auc, fr):
    """Closed grid: AUC = integral of the CED on [0, 0.07] / 0.07 (Simpson, step 1e-4); FR = share above 0.07."""
    a, f = auc_fr(np.array(nmes), 0.07, grid="closed")
    # Sampling a step-shaped CED every 1e-4 is exact only to about one step: 1e-4 / 0.07 = 1.4e-3.
    assert a == pytest.approx(auc, abs=1.5e-3)
    assert f == pytest.approx(fr, abs=1e-12)


def test_f1_hand_computed():
    """gt [0,0,1,1,2,2] vs pred [0,1,1,1,2,0]: F1 = 0.5, 0.8, 2/3; mean over classes 1 and 2."""
    conf = torch.zeros(3, 3, dtype=torch.int64)
    update_confusion(conf, torch.tensor([0, 1, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    np.testing.assert_allclose(f1_from_confusion(conf), [0.5, 0.8, 2 / 3], rtol=1e-12)
    m = parsing_metrics(conf, class_names=("bg", "a", "b"))
    assert m["f1_mean"] == pytest.approx((0.8 + 2 / 3) / 2, rel=1e-12)
    assert m["f1_bg"] == pytest.approx(0.5) and m["num_pixels"] == 6


def test_f1_from_one_confusion_over_all_pixels():
    """Two images pooled into one matrix: F1 of the pooled counts, not the mean of per-image F1."""
    conf = torch.zeros(2, 2, dtype=torch.int64)
    update_confusion(conf, torch.tensor([[1, 1], [1, 1]]), torch.tensor([[1, 1], [1, 1]]))  # class 1: tp 4
    update_confusion(conf, torch.tensor([0, 0]), torch.tensor([1, 0]))                      # class 1: fn 1
    f1 = f1_from_confusion(conf)[1]
    assert f1 == pytest.approx(8 / 9, rel=1e-12)  # per-image mean would be (1 + 0) / 2 = 0.5


def test_ignore_index_and_absent_class():
    """Ignored pixels are not counted; a class absent from labels and predictions has no F1: the mean is
    NaN by FaRL's rule, or leaves it out (and names it) by ours."""
    conf = torch.zeros(3, 3, dtype=torch.int64)
    update_confusion(conf, torch.tensor([1, 1, 0, 2]), torch.tensor([1, 255, 0, 255]))
    assert int(conf.sum()) == 2
    m = parsing_metrics(conf, class_names=("bg", "a", "b"), absent="skip")
    assert m["f1_b"] is None and m["classes_without_f1"] == ["b"]
    assert m["f1_mean"] == pytest.approx(1.0)
    assert math.isnan(parsing_metrics(conf, class_names=("bg", "a", "b"))["f1_mean"])


def test_bad_inputs_are_named():
    """Shape mismatches and out-of-range labels raise errors that say what is wrong."""
    with pytest.raises(ValueError, match="pred"):
        alignment_metrics(np.zeros((1, 19, 2)), np.zeros((2, 19, 2)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="label values"):
        update_confusion(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="differ in size"):
        update_confusion(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2), torch.zeros(3, 3))
