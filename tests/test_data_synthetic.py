"""Synthetic faces: exact labels, variation, and the three on-disk formats."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mcf_fast.data.formats import FARL_ALIGN, LAPA_POINTS, lapa_split
from mcf_fast.data.synthetic import LANDMARK_CLASSES, draw_face, main


def _cls_at(face, pt):
    x, y = int(round(float(pt[0]))), int(round(float(pt[1])))
    h, w = face.parsing.shape
    return int(face.parsing[y, x]) if 0 <= x < w and 0 <= y < h else -1


def test_same_seed_and_index_give_identical_faces():
    """A face is a pure function of (seed, index, size)."""
    a, b, c = draw_face(3, 17, 96), draw_face(3, 17, 96), draw_face(3, 18, 96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.parsing, b.parsing)
    assert np.array_equal(a.landmarks, b.landmarks)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [96, 128, 256])
def test_landmarks_land_inside_their_drawn_features(size):
    """Every one of the 19 points falls on a pixel of its own parsing class (brow on brow, ...)."""
    for i in range(60):
        f = draw_face(11, i, size)
        for k, pt in enumerate(f.landmarks):
            assert _cls_at(f, pt) in LANDMARK_CLASSES[k], (i, k, _cls_at(f, pt))


def test_parsing_map_agrees_with_landmarks_and_box():
    """Class centroids sit near their landmarks; left classes are image-left; the box holds the skin."""
    for i in range(30):
        f = draw_face(5, i, 128)
        lm = f.landmarks
        for cls, centre in ((4, lm[7]), (5, lm[10])):
            ys, xs = np.nonzero(f.parsing == cls)
            assert len(xs) > 5
            # eye centroid within 1.5 px of the eye-centre landmark (the lens is symmetric)
            assert np.hypot(xs.mean() - centre[0], ys.mean() - centre[1]) < 1.5
        # "left" = image-left in a face rolled by at most 25 degrees
        assert lm[7, 0] < lm[10, 0] and lm[1, 0] < lm[4, 0] and lm[15, 0] < lm[17, 0]
        l, r, t, b = f.bbox
        ys, xs = np.nonzero(f.parsing == 1)
        assert xs.min() >= np.floor(l) - 1 and xs.max() <= np.ceil(r) + 1
        assert ys.min() >= np.floor(t) - 1 and ys.max() <= np.ceil(b) + 1
        assert (lm[:, 0] > l).all() and (lm[:, 0] < r).all() and (lm[:, 1] > t).all() and (lm[:, 1] < b).all()


def test_faces_vary_as_documented():
    """Over 200 faces: open and closed mouths, bald and haired heads, rolls both ways, several qualities."""
    faces = [draw_face(1, i, 64) for i in range(200)]
    open_mouth = [bool((f.parsing == 8).any()) for f in faces]
    hair = [bool((f.parsing == 10).any()) for f in faces]
    rolls = [np.degrees(np.arctan2(*(f.landmarks[10] - f.landmarks[7])[::-1])) for f in faces]
    assert 0.2 < np.mean(open_mouth) < 0.8 and 0.5 < np.mean(hair) < 0.95
    assert min(rolls) < -15 and max(rolls) > 15
    assert len({f.quality for f in faces}) > 10
    assert np.std([f.image.mean() for f in faces]) > 10  # lighting / skin / background vary


def test_wds_format_round_trips(tmp_path):
    """wds shards hold KEY.jpg/KEY.json readable by webdataset, plus DALI indexes and a manifest."""
    import webdataset as wds
    out = tmp_path / "wds"
    main(["--out", str(out), "--num", "7", "--size", "64", "--format", "wds", "--shard-size", "4", "--seed", "2"])
    shards = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    assert shards == ["faces-000000.tar", "faces-000001.tar"]
    assert all((out / (s + ".idx")).exists() for s in shards)
    man = json.loads((out / "manifest.json").read_text())
    assert man["samples"] == 7
    samples = list(wds.WebDataset([str(out / s) for s in shards], shardshuffle=False))
    assert len(samples) == 7
    meta = json.loads(samples[3]["json"])
    ref = draw_face(2, meta["index"], 64)
    np.testing.assert_allclose(meta["landmarks"], ref.landmarks, atol=1e-3)
    img = np.asarray(Image.open(__import__("io").BytesIO(samples[3]["jpg"])))
    assert img.shape == (64, 64, 3) and np.abs(img.astype(int) - ref.image).mean() < 12  # JPEG loss only


def test_aflw19_format_reads_back_with_the_eval_reader(tmp_path):
    """AFLWinfo_release.mat + data/flickr images + split.json match what mcf_fast.eval reads."""
    from mcf_fast.eval.datasets import read_aflw19
    out = tmp_path / "aflw"
    main(["--out", str(out), "--num", "10", "--size", "96", "--format", "aflw19", "--train-fraction", "0.7"])
    train, test = read_aflw19(str(out), "train"), read_aflw19(str(out), "test")
    assert len(train) == 7 and len(test) == 3
    rec = test[0]
    idx = int(os.path.basename(rec.image)[:6])
    ref = draw_face(0, idx, 96)
    np.testing.assert_allclose(rec.landmarks, ref.landmarks, atol=1e-4)
    np.testing.assert_allclose(rec.box, ref.bbox, atol=1e-4)
    assert Image.open(rec.image).size == (96, 96)


def test_lapa_format_labels_and_106_points(tmp_path):
    """LaPa layout: label PNG equals the parsing map; 106 points with the 19 real ones first."""
    from mcf_fast.eval.datasets import read_lapa, read_lapa_landmarks
    out = tmp_path / "lapa"
    main(["--out", str(out), "--num", "6", "--size", "96", "--format", "lapa", "--seed", "4"])
    recs = {sp: read_lapa(str(out), sp) for sp in ("train", "val", "test")}
    assert [len(recs[s]) for s in ("train", "val", "test")] == [4, 1, 1] == [lapa_split(6, 0.8).count(s)
                                                                           for s in ("train", "val", "test")]
    rec = recs["val"][0]
    idx = int(os.path.basename(rec.image)[:6])
    ref = draw_face(4, idx, 96)
    assert np.array_equal(np.asarray(Image.open(rec.label)), ref.parsing)
    pts = read_lapa_landmarks(str(out / "val" / "landmarks" / f"{idx:06d}.txt"))
    assert pts.shape == (LAPA_POINTS, 2)
    np.testing.assert_allclose(pts[:19], ref.landmarks, atol=1e-3)
    # FaRL's five alignment points are the eye centres, nose tip and mouth corners
    np.testing.assert_allclose(pts[list(FARL_ALIGN)], ref.landmarks[list(FARL_ALIGN.values())], atol=1e-3)
    # the other extra points lie on the skin outline: just inside or just outside the skin class
    ring = [_cls_at(ref, p) for k, p in enumerate(pts) if k >= 19 and k not in FARL_ALIGN]
    assert len(ring) == LAPA_POINTS - 19 - len(FARL_ALIGN) and all(c in (0, 1, 10) for c in ring)


def test_cli_rejects_bad_arguments(tmp_path):
    """Bad sizes and fractions are refused with a message, not a crash."""
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num", "3", "--size", "8", "--format", "wds"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num", "3", "--size", "64", "--format", "lapa", "--train-fraction", "1.5"])


def test_the_command_shows_progress(tmp_path, capsys):
    """`python -m mcf_fast.data.synthetic` counts the faces it writes on stderr and ends with a summary."""
    assert main(["--out", str(tmp_path / "wds"), "--num", "7", "--size", "32", "--format", "wds"]) == 0
    out, err = capsys.readouterr()
    assert "7/7" in err and "face" in err
    assert out.startswith("wrote 7 faces in 1 shard(s)")
