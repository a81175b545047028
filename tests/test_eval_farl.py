"""FaRL's downstream protocol: template fit, forward/inverse warps, scoring at the original resolution, head, losses."""
import math

import numpy as np
import pytest
import torch

from mcf_fast.eval import farl
from mcf_fast.eval.config import EvalConfig
from mcf_fast.eval.datasets import read_lapa, read_lapa_landmarks
from mcf_fast.eval.farl_data import FarlAlignmentData, FarlParsingData, lapa_matrix, photometric
from mcf_fast.eval.metrics import parsing_metrics, update_confusion
from mcf_fast.eval.toydata import write_lapa
from mcf_fast.eval.transforms import CENTRE, load_label
from mcf_fast.eval.uper import FarlHead, awing_heatmaps, farl_level_blocks, heatmap_points


@pytest.fixture(scope="module")
def lapa(tmp_path_factory):
    """A tiny LaPa folder whose 106-point files carry FaRL's five alignment points."""
    root = tmp_path_factory.mktemp("lapa")
    write_lapa(str(root), {"train": 2, "val": 1, "test": 3}, 48, seed=5)
    return root


def _similarity(rng):
    a, s = rng.uniform(-0.6, 0.6), rng.uniform(0.05, 0.3)
    return np.array([[s * math.cos(a), -s * math.sin(a), rng.uniform(0, 40)],
                     [s * math.sin(a), s * math.cos(a), rng.uniform(0, 40)], [0, 0, 1.0]])


def test_template_is_farls_512_frame_scaled():
    """Template = FaRL's five points placed with (p/256 - 1 + 1)(512 - 1)/2 (+0.5 to our frame), scaled by S/512."""
    t512 = farl.template_points(512)
    raw = np.array([[196.0, 226.0], [316.0, 226.0], [256.0, 286.0], [220.0, 360.4], [292.0, 360.4]])
    np.testing.assert_allclose(t512, raw * 511 / 512 + 0.5, atol=1e-12)
    np.testing.assert_allclose(farl.template_points(448), t512 * 448 / 512, atol=1e-12)
    assert farl.LAPA_ALIGN_POINTS == (104, 105, 54, 84, 90)


def test_template_points_map_to_the_similarity_fit():
    """Exact similarity images of the template come back exactly; noisy ones give the least-squares fit."""
    rng = np.random.default_rng(0)
    tmpl = farl.template_points(64)
    for _ in range(5):
        t = _similarity(rng)
        src = farl.to_input(tmpl, np.linalg.inv(t), 64, 0.0)  # template -> some image
        np.testing.assert_allclose(farl.to_input(src, farl.similarity_fit(src, tmpl), 64, 0.0), tmpl, atol=1e-9)
        noisy = src + rng.normal(0, 0.5, src.shape)
        m = farl.similarity_fit(noisy, tmpl)
        # independent check: the 4-parameter linear least squares [a -b tx; b a ty]
        rows = [[x, -y, 1, 0] for x, y in noisy] + [[y, x, 0, 1] for x, y in noisy]
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.concatenate([tmpl[:, 0], tmpl[:, 1]]), rcond=None)[0]
        np.testing.assert_allclose(m[:2], [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_lapa_matrix_uses_the_five_landmarks(lapa):
    """The alignment matrix takes the file's points 104, 105, 54, 84, 90 (+0.5) onto their template fit."""
    rec = read_lapa(str(lapa), "test")[0]
    lm = read_lapa_landmarks(rec.landmarks)
    m = lapa_matrix(rec, 96)
    five = lm[list(farl.LAPA_ALIGN_POINTS)]
    fit = farl.similarity_fit(five + 0.5, farl.template_points(96))
    np.testing.assert_allclose(farl.to_input(five, m, 96, 0.0), farl.to_input(five + 0.5, fit, 96, 0.0), atol=1e-9)
    # eyes land left/right of the centre, the mouth below the nose: the face is upright in the input
    p = farl.to_input(five, m, 96, 0.0)
    assert p[0, 0] < 48 < p[1, 0] and p[3, 1] > p[2, 1] and p[4, 1] > p[2, 1]
    with pytest.raises(ValueError, match="106"):
        farl.lapa_align_matrix(lm[:19], 96)
    with pytest.raises(ValueError, match="coincide"):
        farl.lapa_align_matrix(np.zeros((106, 2)), 96)


@pytest.mark.parametrize("wf", [0.0, 0.8])
def test_inverse_of_forward_point_warp_is_identity(wf):
    """from_input(to_input(p)) == p for points across the image, with and without the tanh warp."""
    rng = np.random.default_rng(1)
    m = _similarity(rng) @ np.diag([4.0, 4.0, 1.0])
    pts = rng.uniform(-5, 60, (200, 2))
    np.testing.assert_allclose(farl.from_input(farl.to_input(pts, m, 64, wf), m, 64, wf), pts, atol=1e-7)


@pytest.mark.parametrize("wf", [0.0, 0.8])
def test_separable_input_grid_equals_the_pointwise_inverse(wf):
    """input_grid (1-D tanh inverse + broadcast matrix) == from_input on every input pixel centre (+0.5)."""
    m = _similarity(np.random.default_rng(4)) @ np.diag([3.0, 3.0, 1.0])
    ys, xs = np.mgrid[0:40, 0:40] + 0.5
    full = farl.from_input(np.stack([xs, ys], -1), m, 40, wf) + 0.5
    np.testing.assert_allclose(farl.input_grid(m, 40, wf), full, atol=1e-9)


def test_tanh_warp_is_linear_inside_and_squashes_outside():
    """Inside |u| <= 1 - f the warp is the identity; far points land inside the input, monotonically."""
    u = np.linspace(-0.2, 0.2, 11)
    np.testing.assert_allclose(farl._tanh_part(u, 0.8, inverse=False), u, atol=1e-12)
    far = np.linspace(-3, 3, 301)  # (tanh reaches 1.0 in float64 beyond |u| ~ 15)
    w = farl._tanh_part(far, 0.8, inverse=False)
    assert np.all(np.abs(w) < 1) and np.all(np.diff(w) > 0)


@pytest.mark.parametrize("wf", [0.0, 0.8])
def test_inverse_image_warp_of_forward_warp_is_identity(lapa, wf):
    """A smooth image warped to the input and back matches itself where the input samples it densely."""
    rec = read_lapa(str(lapa), "test")[0]
    m, size, hw = lapa_matrix(rec, 160), 160, (48, 48)
    ys, xs = np.mgrid[0:48, 0:48].astype(np.float64)
    img = torch.from_numpy(np.sin(xs / 6.0) + np.cos(ys / 8.0)).float()[None]
    back = farl.warp_to_original(farl.warp_to_input(img, m, size, wf), m, size, wf, hw)[0].numpy()
    # where one original pixel spans >= 1 input pixel and lands inside the input, only interpolation remains
    c = np.stack([xs, ys], -1)
    p, px, py = (farl.to_input(c + d, m, size, wf) for d in ((0, 0), (1, 0), (0, 1)))
    dense = (np.linalg.norm(px - p, axis=-1) >= 1) & (np.linalg.norm(py - p, axis=-1) >= 1)
    inside = np.all((p > 1) & (p < size - 1), axis=-1)
    interior = (xs >= 1) & (xs <= 46) & (ys >= 1) & (ys <= 46)  # the forward warp reads zeros past the border
    keep = dense & inside & interior
    assert keep.sum() > 300
    err = np.abs(back - img[0].numpy())[keep]
    assert err.max() < 0.05, err.max()


@pytest.mark.parametrize("wf", [0.0, 0.8])
def test_perfect_aligned_prediction_scores_f1_one_at_original_resolution(lapa, wf):
    """The dataset's warped label as one-hot logits, warped back to the original grid, scores F1 ~1.0."""
    recs = read_lapa(str(lapa), "test")
    ds = FarlParsingData(recs, 192, [0.5] * 3, [0.5] * 3, warp_factor=wf)
    conf = torch.zeros(11, 11, dtype=torch.int64)
    for i in range(len(recs)):
        item = ds[i]
        logits = torch.nn.functional.one_hot(item["label"], 11).permute(2, 0, 1).float()
        gt = torch.from_numpy(np.asarray(load_label(recs[i].label), np.int64))
        pred = farl.warp_to_original(logits, item["matrix"].numpy(), 192, wf, tuple(gt.shape)).argmax(0)
        update_confusion(conf, pred, gt)
    m = parsing_metrics(conf)
    assert m["num_pixels"] == len(recs) * 48 * 48  # every original pixel is scored
    assert m["f1_mean"] > 0.97, m


def test_image_and_points_move_together():
    """A blob at a dataset point appears at to_input(point) after the warp (box crop and tanh centre)."""
    ys, xs = np.mgrid[0:60, 0:60].astype(np.float64)
    p = np.array([31.0, 27.0])
    blob = torch.from_numpy(np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / 8.0)).float()[None]
    box_m = farl.aflw_box_matrix(np.array([10.0, 50.0, 8.0, 48.0]), 80)
    five = np.array([[20.0, 20], [40, 20], [31, 28], [24, 40], [38, 40]])
    lapa_m = farl.similarity_fit(five + 0.5, farl.template_points(80)) @ CENTRE
    for m, wf in ((box_m, 0.0), (box_m, 0.8), (lapa_m, 0.8)):
        w = farl.warp_to_input(blob, m, 80, wf)[0].numpy()
        gy, gx = np.mgrid[0:80, 0:80] + 0.5
        c = np.array([(w * gx).sum(), (w * gy).sum()]) / w.sum()
        np.testing.assert_allclose(c, farl.to_input(p, m, 80, wf), atol=0.35)


def test_aflw_box_matrix_is_farls_crop():
    """The box's edges go to the input's edges: FaRL's (x - x1) w / (x2 - x1) - 0.5 in pixel-centre terms."""
    box = np.array([12.0, 52.0, 7.0, 67.0])  # left, right, top, bottom (a non-square box is stretched)
    m = farl.aflw_box_matrix(box, 448)
    corners = farl.to_input(np.array([[12.0, 7.0], [52.0, 67.0]]), m, 448, 0.0)
    np.testing.assert_allclose(corners, [[0, 0], [448, 448]], atol=1e-9)
    x = np.array([[30.0, 40.0]])
    farl_centre = [(30 - 12) * 448 / 40 - 0.5, (40 - 7) * 448 / 60 - 0.5]
    np.testing.assert_allclose(farl.to_input(x, m, 448, 0.0) - 0.5, [farl_centre], atol=1e-9)
    with pytest.raises(ValueError, match="empty"):
        farl.aflw_box_matrix(np.array([5.0, 5.0, 0.0, 9.0]), 64)


def test_jitter_ranges_follow_farl():
    """AFLW: rotation within +-0.174 rad, scale in [0.9, 1.1], shift within 0.05 S; LaPa rotation is normal."""
    rng = np.random.default_rng(3)
    ang, sc = [], []
    for _ in range(300):
        j = farl.farl_jitter(rng, 100, "alignment")
        ang.append(math.atan2(j[1, 0], j[0, 0]))
        sc.append(math.hypot(j[0, 0], j[1, 0]))
        centre = j[:2, :2] @ [50, 50] + j[:2, 2]
        assert np.all(np.abs(centre - 50) <= 5 + 1e-9)
    assert max(map(abs, ang)) <= 0.174 and 0.9 <= min(sc) and max(sc) <= 1.1
    lap = [math.atan2(*farl.farl_jitter(rng, 100, "parsing")[[1, 0], 0]) for _ in range(400)]
    assert 0.25 < np.std(lap) < 0.38  # N(0, 0.314)


def test_farl_levels_head_stride_and_heatmap_read_out():
    """FaRL's blocks (12 -> 3,5,7,11), a stride-4 output for patch 16 and 8, and heatmap2points on its targets."""
    assert farl_level_blocks(12) == [3, 5, 7, 11] and farl_level_blocks(24) == [7, 11, 15, 23]
    for patch in (16, 8):
        head = FarlHead(24, patch, 5, channels=8).eval()
        g = 64 // patch
        out = head([torch.randn(2, 24, g, g) for _ in range(4)])
        assert head.out_stride * out.shape[-1] == 64 and head.out_stride == 4
    with pytest.raises(ValueError, match="patch"):
        FarlHead(24, 4, 5, 8)
    pts01 = torch.tensor([[[10.5 / 32, 20.5 / 32], [16.5 / 32, 12.5 / 32]]])  # away from the borders
    target = awing_heatmaps(pts01, 32, 5.0)
    assert target[0, 0, 20, 10] == 1 and abs(float(target[0, 0, 20, 12]) - math.exp(-16 * 4 / 50)) < 1e-6
    assert target[0, 0, 20, 16] == 0  # beyond the radius
    logits = torch.logit(target.clamp(1e-7, 1 - 1e-7))
    np.testing.assert_allclose(heatmap_points(logits, 1.0).numpy(), (pts01 * 32).numpy(), atol=1e-3)


def test_photometric_keeps_range_and_is_seeded():
    """FaRL's colour augmentations stay in [0, 1] and repeat for the same generator state."""
    x = torch.rand(3, 64, 64)
    a = photometric(x, np.random.default_rng(7), "alignment")
    b = photometric(x, np.random.default_rng(7), "alignment")
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1


def test_alignment_items_carry_points_in_input_pixels(tmp_path):
    """FarlAlignmentData: points = to_input(landmarks) under the item's matrix, with and without jitter."""
    from mcf_fast.eval.datasets import read_aflw19
    from mcf_fast.eval.toydata import write_aflw19
    write_aflw19(str(tmp_path), 6, 48, seed=2, train_count=4)
    recs = read_aflw19(str(tmp_path), "train")
    for aug in (False, True):
        ds = FarlAlignmentData(recs, 64, [0.5] * 3, [0.5] * 3, augment=aug, seed=1)
        it = ds[(1, 5)]
        pts = farl.to_input(recs[1].landmarks, it["matrix"].numpy(), 64, 0.0)
        np.testing.assert_allclose(it["points"].numpy(), pts, atol=1e-4)


def test_protocol_defaults_fill_only_unset_fields():
    """farl's FaRL values (lr, backbone scale, wd, EMA, warp) fill sentinels; explicit values and errors stay."""
    c = EvalConfig(task="parsing", data="d", encoder="e", out="o").resolved()
    assert (c.lr, c.backbone_lr_scale, c.weight_decay, c.ema_decay, c.warp_factor, c.head_width, c.schedule) == \
        (1e-3, 0.1, 1e-5, 0.999, 0.8, 768, "step")
    a = EvalConfig(task="alignment", data="d", encoder="e", out="o", lr=3e-3).resolved()
    assert (a.lr, a.backbone_lr_scale, a.warp_factor, a.heatmap_weight) == (3e-3, 0.01, 0.0, 1.0)
    s = EvalConfig(task="parsing", data="d", encoder="e", out="o", protocol="resize-whole", max_steps=100).resolved()
    assert (s.lr, s.layer_decay, s.warmup_steps, s.schedule, s.ema_decay) == (5e-4, 0.75, 5, "cosine", 0.0)
    with pytest.raises(ValueError, match="resize-whole"):
        EvalConfig(task="parsing", data="d", encoder="e", out="o", protocol="square-crop").validate()


def test_parsing_without_landmarks_is_refused_up_front(tmp_path):
    """Under farl a LaPa split lacking landmark files fails before training, naming the fix."""
    import os

    from mcf_fast.eval.tasks import ParsingTask
    write_lapa(str(tmp_path), {"train": 2, "val": 1, "test": 1}, 32, seed=0)
    os.remove(tmp_path / "train" / "landmarks" / "000001.txt")
    cfg = EvalConfig(task="parsing", data=str(tmp_path), encoder="e", out="o").resolved()
    with pytest.raises(FileNotFoundError, match="resize-whole"):
        ParsingTask(cfg, 32, [0.5] * 3, [0.5] * 3).train_data()
    simple = EvalConfig(task="parsing", data=str(tmp_path), encoder="e", out="o", protocol="resize-whole").resolved()
    assert len(ParsingTask(simple, 32, [0.5] * 3, [0.5] * 3).train_data()) == 2
