"""prepare from given face boxes (LAION-Face's released detections, JSON/JSONL/parquet), and the MTCNN detector."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mcf_fast.data import mtcnn
from mcf_fast.data.boxes import load_boxes
from mcf_fast.data.prepare import main as prepare_main
from mcf_fast.data.prepare import prepare

BOX = (40.0, 30.0, 100.0, 110.0)  # x1, y1, x2, y2 of the red square drawn in every test image


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, (160, 200, 3), dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in BOX)
    img[y1:y2, x1:x2] = (250, 10, 10)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, samples):
    """An img2dataset-style shard: KEY.png + KEY.json carrying SAMPLE_ID, as LAION-Face's download writes.
    Written under PARENT/in/ (prepare refuses an output inside its input's folder); returns its path."""
    path = path.parent / "in" / path.name
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, sample_id in samples:
            for name, data in ((f"{key}.png", _image(sample_id)),
                               (f"{key}.json", json.dumps({"key": key, "SAMPLE_ID": sample_id}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _laion_face_pth(path, entries, legacy_numpy_names=False):
    """sample2detect_N.pth as LAION-Face releases it: {int SAMPLE_ID: [(box xyxy, landmarks [5, 2], score)]}."""
    buf = io.BytesIO()
    torch.save(entries, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    if legacy_numpy_names:  # written under numpy 1.x, as the 2022 release was
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)


def _crops(out):
    with tarfile.open(out / "faces-000000.tar") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def _face(box, score):
    return (np.asarray(box, np.float32), np.zeros((5, 2), np.float32), np.float32(score))


@pytest.mark.parametrize("legacy", [False, True])
def test_laion_face_detections_crop_the_given_box(tmp_path, legacy):
    """A LAION-Face .pth (numpy 1 or 2 pickles) is matched by SAMPLE_ID; the crop is the given box, no detector."""
    shard = _shard(tmp_path / "00000.tar", [("000000000", 7001), ("000000001", 7002), ("000000002", 7003)])
    _laion_face_pth(tmp_path / "sample2detect_0.pth",
                    {7001: [_face(BOX, 0.99)], 7002: [_face((0, 0, 20, 20), 0.2), _face(BOX, 0.98)]}, legacy)
    out = tmp_path / "out"
    rc = prepare_main(["--input", str(shard), "--out", str(out), "--boxes",
                       str(tmp_path / "sample2detect_0.pth"), "--min-score", "0.5", "--margin", "0",
                       "--min-face", "16", "--size", "32", "--workers", "1"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["samples"] == 2 and man["skipped_by_reason"] == {"no_face": 1}
    files = _crops(out)
    for key in ("000000000_0", "000000001_0"):
        assert json.loads(files[f"{key}.json"])["box"] == [40.0, 30.0, 60.0, 80.0]
        crop = np.asarray(Image.open(io.BytesIO(files[f"{key}.jpg"]))).astype(int)
        assert crop[8:24, 8:24, 0].mean() > 200 and crop[8:24, 8:24, 1:].mean() < 60  # the red square


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_table_formats_give_the_same_boxes(tmp_path, fmt):
    """JSON {key: boxes}, JSONL records and parquet records (x, y, w, h here) read to the same table."""
    rows = [{"key": "a", "boxes": [[40, 30, 60, 80]], "scores": [0.9]}, {"SAMPLE_ID": 5, "box": [1, 2, 3, 4]}]
    path = tmp_path / f"boxes.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"a": [[40, 30, 60, 80, 0.9]], "5": [[1, 2, 3, 4]]}))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"key": "a", "boxes": [[40.0, 30.0, 60.0, 80.0]], "scores": [0.9]},
                                             {"key": "5", "boxes": [[1.0, 2.0, 3.0, 4.0]], "scores": [1.0]}]),
                       str(path))
    table = load_boxes(str(path))
    assert sorted(table) == ["5", "a"]
    box, sc = table["a"][0]
    assert box.tolist() == [40, 30, 60, 80] and sc == pytest.approx(0.9)
    assert table["5"][0][0].tolist() == [1, 2, 3, 4]


def test_hostile_box_file_executes_nothing(tmp_path):
    """A .pth whose pickle reduces to os.system is refused by name; the marker file is never created."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({1: Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a weights-only box file"):
        load_boxes(str(tmp_path / "evil.pth"))
    shard = _shard(tmp_path / "in.tar", [("k", 1)])
    rc = prepare_main(["--input", str(shard), "--out", str(tmp_path / "out"), "--boxes",
                       str(tmp_path / "evil.pth"), "--workers", "1"])
    assert rc == 2 and not marker.exists()
    assert not (tmp_path / "out" / "faces-000000.tar").exists()


@pytest.mark.parametrize("args, msg", [
    (["--boxes", "missing.pth"], "does not exist"),
    (["--boxes", "b.json", "--detector", "lbp"], "drop --detector lbp"),
    (["--detector", "boxes"], "needs --boxes FILE"),
    (["--boxes", "b.txt"], "unknown extension"),
])
def test_box_option_mistakes_are_one_line_errors(tmp_path, capsys, args, msg):
    """Wrong box options exit 2 before any work, with a message naming the fix."""
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "b.txt").write_text("")
    shard = _shard(tmp_path / "in.tar", [("k", 1)])
    args = [str(tmp_path / a) if a.startswith(("missing", "b.")) else a for a in args]
    assert prepare_main(["--input", str(shard), "--out", str(tmp_path / "o"), *args]) == 2
    assert msg in capsys.readouterr().err


def test_box_entries_that_are_not_boxes_are_refused(tmp_path):
    """A dict whose values are not boxes says what it expected."""
    (tmp_path / "b.json").write_text(json.dumps({"a": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="4 box numbers"):
        load_boxes(str(tmp_path / "b.json"))


needs_mtcnn = pytest.mark.skipif(not mtcnn.available(), reason="MTCNN weights not installed "
                                 "(pip install --no-deps facenet-pytorch==2.6.0)")


@needs_mtcnn
def test_mtcnn_finds_real_faces_and_not_cats():
    """MTCNN finds the astronaut's and the cameraman's faces (hand-drawn boxes, IoU >= 0.5) and nothing in cat/coffee."""
    skimage_data = pytest.importorskip("skimage.data")
    from benchmarks.bench_detect import PORTRAITS, iou
    det = mtcnn.MTCNN(min_face=40)
    for name in ("astronaut", "camera"):
        img = skimage_data.astronaut() if name == "astronaut" else np.stack([skimage_data.camera()] * 3, -1)
        found = det(img)
        assert len(found) == 1 and iou(found[0][:4], PORTRAITS[name][0]) >= 0.5 and found[0][4] > 0.9
    assert det(skimage_data.chelsea()) == [] and det(skimage_data.coffee()) == []


def test_mtcnn_weights_missing_is_a_clear_error(tmp_path):
    """A weights folder without the three files names them and the install command."""
    with pytest.raises(FileNotFoundError, match="facenet-pytorch"):
        mtcnn.MTCNN(weights_dir=str(tmp_path))


def test_nms_keeps_the_best_of_overlapping_boxes():
    """NMS drops a box overlapping a better one above the threshold and keeps a distant one."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    keep = mtcnn.nms(boxes, torch.tensor([0.9, 0.95, 0.5]), 0.5)
    assert keep.tolist() == [1, 2]


def test_prepare_given_boxes_api_matches_cli(tmp_path):
    """prepare(boxes=...) from Python gives the same manifest counts as the CLI path."""
    shard = _shard(tmp_path / "s.tar", [("x", 1), ("y", 2)])
    (tmp_path / "b.json").write_text(json.dumps({"1": [list(BOX)]}))
    man = prepare(str(shard), str(tmp_path / "o"), boxes=str(tmp_path / "b.json"), size=32,
                  min_face=16)
    assert man["samples"] == 1 and man["skipped_by_reason"] == {"no_face": 1}
