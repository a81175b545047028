"""prepare: face detection + crops into validated shards, on a real photo and on synthetic faces."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mcf_fast.data.prepare import main as prepare_main
from mcf_fast.data.prepare import prepare, square_crop
from mcf_fast.data.scan import main as scan_main
from mcf_fast.data.synthetic import draw_face
from mcf_fast.data.synthetic import main as synth_main

skimage_data = pytest.importorskip("skimage.data")


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """astronaut (one face), coffee (no face) and a truncated JPEG."""
    d = tmp_path_factory.mktemp("raw")
    Image.fromarray(skimage_data.astronaut()).save(d / "astronaut.jpg", quality=95)
    Image.fromarray(skimage_data.coffee()).save(d / "coffee.jpg", quality=95)
    (d / "broken.jpg").write_bytes((d / "astronaut.jpg").read_bytes()[:3000])
    return d


def test_real_photo_face_is_found_and_cropped(photo_dir, tmp_path):
    """The astronaut's face (around x 175-270, y 70-165) becomes one 128-px crop; the rest is counted."""
    out = tmp_path / "out"
    assert prepare_main(["--input", str(photo_dir), "--out", str(out), "--size", "128", "--workers", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["samples"] == 1
    assert man["skipped_by_reason"] == {"corrupt": 1, "no_face": 1}
    files = _members(out / "faces-000000.tar")
    info = json.loads(files["astronaut_0.json"])
    x, y, w, h = info["box"]
    assert 200 < x + w / 2 < 245 and 95 < y + h / 2 < 140 and 70 < w < 130
    crop = np.asarray(Image.open(io.BytesIO(files["astronaut_0.jpg"])))
    assert crop.shape == (128, 128, 3)
    assert scan_main([str(out / "faces-000000.tar"), "--workers", "1"]) == 0


def test_prepare_is_resumable(photo_dir, tmp_path):
    """A second run redoes nothing; a deleted shard (or a stale .tmp) is redone alone."""
    out = tmp_path / "out"
    for f in ("astronaut.jpg", "coffee.jpg"):
        os.makedirs(tmp_path / "in", exist_ok=True)
        (tmp_path / "in" / f).write_bytes((photo_dir / f).read_bytes())
    kw = dict(size=64, workers=1, per_unit=1, detector="none")
    first = prepare(str(tmp_path / "in"), str(out), **kw)
    assert (first["new_units"], first["samples"]) == (2, 2)
    again = prepare(str(tmp_path / "in"), str(out), **kw)
    assert (again["reused_units"], again["new_units"]) == (2, 0)
    os.remove(out / "faces-000001.tar")
    (out / "faces-000001.tar.tmp").write_bytes(b"half-written")
    third = prepare(str(tmp_path / "in"), str(out), **kw)
    assert (third["reused_units"], third["new_units"], third["samples"]) == (1, 1, 2)
    assert not (out / "faces-000001.tar.tmp").exists()


def test_synthetic_shards_with_json_boxes_crop_every_face(tmp_path):
    """On synthetic shards (boxes in KEY.json) every face is cropped around its box; output is validated."""
    raw = tmp_path / "raw"
    synth_main(["--out", str(raw), "--num", "6", "--size", "96", "--format", "wds", "--shard-size", "3"])
    out = tmp_path / "out"
    man = prepare(str(raw / "faces-{000000..000001}.tar"), str(out), size=64, detector="json", margin=0.2,
                  min_face=8, workers=1)
    assert man["samples"] == 6 and len(man["shards"]) == 2
    files = _members(out / "faces-000001.tar")
    info = json.loads(files["0000_00000004_0.json"])
    l, r, t, b = draw_face(0, 4, 96).bbox
    np.testing.assert_allclose(info["box"], [l, t, r - l, b - t], atol=0.01)
    from mcf_fast.data.sources import open_source
    assert open_source(str(out), seed=0, img_size=8, synthetic_size=1, cache_mb=0).all_validated


def test_synthetic_folder_with_the_cascade_counts_every_input(tmp_path):
    """With a real detector on synthetic images, crops + skipped add up to the inputs (nothing silent)."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        canvas = np.full((200, 200, 3), 120, np.uint8)
        canvas[36:164, 36:164] = draw_face(2, i, 128).image
        Image.fromarray(canvas).save(d / f"{i}.png")
    man = prepare(str(d), str(tmp_path / "out"), size=64, workers=1, min_face=40)
    entry = man["shards"]["faces-000000.tar"]
    assert entry["inputs"] == 6
    assert entry["faces"] + sum(entry["skipped_by_reason"].values()) == 6
    assert set(entry["skipped_by_reason"]) <= {"no_face", "face_too_small"}


def test_square_crop_pads_at_the_border():
    """A box at the image corner gives a full square with repeated edge pixels, not a smaller crop."""
    img = np.zeros((50, 60, 3), np.uint8)
    img[:, :, 0] = np.arange(60)[None, :]
    crop = square_crop(img, (0, 0, 20, 20), margin=0.5, size=40)
    assert crop.shape == (40, 40, 3)
    assert crop[:, :10, 0].max() == 0  # left padding repeats column 0


def test_bad_options_are_refused(tmp_path):
    """Unknown detectors and impossible sizes are usage errors with a message."""
    assert prepare_main(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--detector", "magic"]) == 2
    with pytest.raises(SystemExit):
        prepare_main(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "4"])


def test_faceless_units_leave_no_empty_shard(photo_dir, tmp_path):
    """One unit per image: units without a face are recorded, not written; the set scans clean and loads."""
    import torch

    from mcf_fast.data import DataConfig, build_pretrain_loader
    out = tmp_path / "out"
    man = prepare(str(photo_dir), str(out), size=64, workers=1, per_unit=1)
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == ["faces-000000.tar"]  # astronaut
    assert [man["shards"][f"faces-00000{i}.tar"].get("empty", False) for i in range(3)] == [False, True, True]
    assert prepare(str(photo_dir), str(out), size=64, workers=1, per_unit=1)["reused_units"] == 3
    pattern = str(out / "faces-{000000..000002}.tar")
    assert scan_main([pattern, "--workers", "1"]) == 0
    loader = build_pretrain_loader(DataConfig(path=pattern, img_size=32, workers=0), batch_size=1)
    assert torch.equal(next(loader).sample_ids, torch.tensor([0]))
    assert "missing_shard" not in loader.stats()["skipped_by_reason"]
