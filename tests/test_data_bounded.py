"""Bounded data files: box files that are not boxes are one line, bad boxes are skipped and counted, crops
allocate about their output, JPEG decode work is bounded, scan reads LMDB databases, and prepare's
mtcnn message names the real fix."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_data_hostile import _jpeg, _lmdb, _Plant, _tar

from mcf_fast.data.decode import decode_rgb
from mcf_fast.data.prepare import main as prepare_main
from mcf_fast.data.prepare import prepare
from mcf_fast.data.reasons import BadSample
from mcf_fast.data.scan import scan


def _box_shard(tmp_path, side=96):
    """A shard of one img2dataset-style sample (SAMPLE_ID 1) whose image is side x side, under tmp/in/."""
    from test_data_boxes import _shard
    shard = _shard(tmp_path / "s.tar", [("k", 1)])
    with tarfile.open(shard, "w") as tf:  # rewrite it with a small image
        for name, data in (("k.jpg", _jpeg(0)), ("k.json", json.dumps({"SAMPLE_ID": 1}).encode())):
            if name == "k.jpg":
                b = io.BytesIO()
                Image.new("RGB", (side, side), (200, 30, 30)).save(b, "JPEG")
                data = b.getvalue()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return shard


@pytest.mark.parametrize("name", ["deep.json", "huge.json", "five.jsonl", "shared.pth"])
def test_box_files_that_are_not_boxes_are_one_line(tmp_path, capsys, name):
    """Deep JSON, a 5000-digit number, a JSONL line `5`, a 1.4 KB .pth whose box is a 3^19-leaf shared tuple:
    prepare --boxes exits 2 with one line before any work (RecursionError / OverflowError / AttributeError /
    a 37 GB np.asarray before)."""
    import hostile
    cases = hostile.box_json_cases()
    f = tmp_path / name
    if name.endswith(".pth"):
        f.write_bytes(hostile.torch_zip(hostile.shared_box()))
    else:
        f.write_text(cases[name])
    shard = _box_shard(tmp_path)
    assert prepare_main(["--input", str(shard), "--out", str(tmp_path / "o"), "--boxes", str(f), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prepare: --boxes {f}") and not (tmp_path / "o").exists()


def test_non_finite_and_outside_boxes_are_skipped_and_counted(tmp_path):
    """Boxes with inf / NaN, a NaN score, or lying outside the image are skipped as bad_box (counted in the
    manifest), a 30000 px box on a 96 px image is clipped to the image: one crop, no traceback."""
    (tmp_path / "b.json").write_text('{"1": [[0, 0, Infinity, 50], [NaN, 1, 2, 3], [200, 200, 300, 300], '
                                     '[-30000, -30000, 30000, 30000, NaN], [-30000, -30000, 30000, 30000, 0.9]]}')
    man = prepare(str(_box_shard(tmp_path)), str(tmp_path / "o"), boxes=str(tmp_path / "b.json"), size=32,
                  min_face=8, max_faces=5)
    entry = man["shards"]["faces-000000.tar"]
    assert entry["faces"] == 1 and entry["skipped_by_reason"] == {"bad_box": 4}


def test_square_crop_of_a_huge_box_allocates_about_the_output():
    """A 48000 px square around a 96 px image (a 30000 px box with margin 0.3) allocates about the 256 px
    output, not the 6.9 GB padded square; a crop inside the image is the plain resize it always was."""
    import tracemalloc

    from mcf_fast.data.augment import _resize
    from mcf_fast.data.prepare import square_crop
    img = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    tracemalloc.start()
    crop = square_crop(img, (-15000, -15000, 30000, 30000), 0.3, 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert crop.shape == (256, 256, 3) and peak < 4 * 256 * 256 * 3, peak
    assert np.array_equal(square_crop(img, (30, 30, 20, 20), 0.3, 64), _resize(img[24:56, 24:56].copy(), 64, 64))  # side 32 at 24


def _progressive(side: int, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans (libjpeg writes 10)."""
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        b, "JPEG", progressive=True)
    data = b.getvalue()
    last = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last * max(0, scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def test_jpeg_scan_work_is_bounded_before_decoding(tmp_path):
    """A progressive JPEG with 300 scans (within every byte and pixel limit) is too_many_scans before any
    decoding, in the decoder and in scan; 10-scan progressive JPEGs decode; the bound follows max_pixels."""
    from mcf_fast.data.decode import JPEG_SCAN_WORK, MAX_JPEG_SCANS
    assert decode_rgb(_progressive(64, 10))[0].shape == (64, 64, 3)
    with pytest.raises(BadSample, match="too_many_scans: 300 scans"):
        decode_rgb(_progressive(64, 300))
    with pytest.raises(BadSample, match="too_many_scans"):  # 20 scans of 64x64 > 12 x a 4096-pixel limit
        decode_rgb(_progressive(64, 20), max_pixels=64 * 64)
    assert decode_rgb(_progressive(64, MAX_JPEG_SCANS))[0].shape == (64, 64, 3) and JPEG_SCAN_WORK == 12
    _tar(tmp_path / "s.tar", [("a.jpg", _progressive(64, 10)), ("b.jpg", _progressive(64, 300))])
    assert scan(str(tmp_path / "s.tar"))["skipped"] == {"too_many_scans": 1}


def test_scan_reads_an_lmdb_database(tmp_path, capsys):
    """scan on an LMDB decodes its values (was: "not synthetic data ('')"); a value pickling code is
    unsafe_pickle; '' says there is nothing to scan."""
    from mcf_fast.data.scan import main as scan_main
    good = [pickle.dumps((_jpeg(i), i), protocol=2) for i in range(3)]
    _lmdb(tmp_path / "db", values=good + [pickle.dumps((_Plant(str(tmp_path / "x")), 1))])
    rep = scan(str(tmp_path / "db"))
    assert rep["ok"] == 3 and rep["skipped"] == {"unsafe_pickle": 1} and not (tmp_path / "x").exists()
    assert scan_main(["", "--workers", "1"]) == 2
    assert "'' (synthetic faces) has nothing to scan" in capsys.readouterr().err


def test_mtcnn_without_weights_names_the_real_fix(monkeypatch, capsys, tmp_path):
    """prepare --detector mtcnn without its weights: one line naming the pip command, no made-up option."""
    from mcf_fast.data import mtcnn
    monkeypatch.setattr(mtcnn, "available", lambda weights_dir="": False)
    (tmp_path / "in").mkdir()
    rc = prepare_main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--detector", "mtcnn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install --no-deps facenet-pytorch" in err[0]
    assert "--detector-weights" not in err[0] and "--detector-weights" not in mtcnn.__doc__
