"""prepare after the base install, its one-line refusals before anything is written, and what it reports."""
import ast
import json
import os
import re
import sys

import pytest
from PIL import Image

from mcf_fast.data import augment, detectors
from mcf_fast.data import prepare as prepare_mod
from mcf_fast.data.prepare import main as prepare_main
from mcf_fast.data.prepare import prepare
from mcf_fast.data.synthetic import main as synth_main

skimage_data = pytest.importorskip("skimage.data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Importable names of what only the extras (or a separate pip line) bring: absent after README command 1.
OPTIONAL = ("cv2", "simplejpeg", "facenet_pytorch", "lmdb", "pyarrow", "torchvision", "timm", "xformers", "nvidia")


def _block(monkeypatch, *names):
    """As if these packages were not installed: their imports fail and find_spec finds nothing."""
    for name in names:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, mod, None)
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """astronaut (one face), coffee (no face) and a truncated JPEG."""
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(d / "astronaut.jpg", quality=95)
    Image.fromarray(skimage_data.coffee()).save(d / "coffee.jpg", quality=95)
    (d / "broken.jpg").write_bytes((d / "astronaut.jpg").read_bytes()[:3000])
    return d


def _install_requires() -> set:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    kw = next(k for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "install_requires")
    return {re.split(r"[<>=!~\[; ]", e.value)[0].lower() for e in kw.value.elts}


def test_auto_falls_back_to_a_detector_the_base_install_brings():
    """The last detector `auto` tries needs only packages of install_requires (README command 1)."""
    last = detectors.DETECTORS.get(detectors.AUTO[-1])
    assert last.package and last.package in _install_requires()


def test_prepare_runs_after_the_base_install(photo_dir, tmp_path, monkeypatch, capsys):
    """Without any extra (no OpenCV, simplejpeg, MTCNN weights, ...) prepare crops the astronaut with lbp."""
    _block(monkeypatch, *OPTIONAL)
    monkeypatch.setattr(augment, "cv2", None)
    out = tmp_path / "faces"
    assert prepare_main(["--input", str(photo_dir), "--out", str(out), "--size", "64", "--workers", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["settings"]["detector"] == "lbp" and man["samples"] == 1
    assert "detector lbp" in capsys.readouterr().out


@pytest.mark.parametrize("blocked,detector,needle", [
    (("facenet_pytorch", "skimage"), "auto", "found none of mtcnn, lbp"),
    (("skimage",), "lbp", "pip install scikit-image"),
    (("cv2",), "haar", "pip install 'opencv-python-headless<5'"),
    (("facenet_pytorch",), "mtcnn", "pip install --no-deps facenet-pytorch==2.6.0"),
])
def test_a_missing_piece_is_one_line_naming_its_install(photo_dir, tmp_path, monkeypatch, capsys, blocked, detector,
                                                         needle):
    """A detector that cannot run here: exit 2, one line with the pip command, and no --out folder at all."""
    _block(monkeypatch, *blocked)
    out = tmp_path / "faces"
    assert prepare_main(["--input", str(photo_dir), "--out", str(out), "--detector", detector]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "pip install" in err, err
    assert not out.exists()


def test_resume_into_an_out_made_otherwise_is_refused(photo_dir, tmp_path, capsys):
    """Another --size or --detector: one line naming both values; the folder is left as it was. Same settings resume."""
    out = tmp_path / "faces"
    kw = dict(size=64, workers=1, per_unit=1, detector="none", min_face=8)
    prepare(str(photo_dir), str(out), **kw)
    before = (out / "manifest.json").read_bytes()
    for args, needle in ((["--size", "32"], "--size 64 there, 32 now"),
                         (["--detector", "json", "--size", "64"], "--detector none there, json now")):
        assert prepare_main(["--input", str(photo_dir), "--out", str(out), "--per-unit", "1", "--min-face", "8",
                             "--workers", "1", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "new --out" in err, err
    assert (out / "manifest.json").read_bytes() == before
    assert prepare(str(photo_dir), str(out), **kw)["reused_units"] == 3


def test_an_out_holding_other_shards_is_refused(tmp_path, photo_dir):
    """prepare never adds its faces-N.tar to a folder of shards another tool wrote (same names)."""
    synth_main(["--out", str(tmp_path / "wds"), "--num", "2", "--size", "32", "--format", "wds"])
    with pytest.raises(ValueError, match="holds shards written by synthetic, not by prepare"):
        prepare(str(photo_dir), str(tmp_path / "wds"), size=32, detector="none")


def test_summary_reports_skips_by_reason_and_manifest_names_the_folder(photo_dir, tmp_path, capsys):
    """The closing lines count each skip reason with its meaning and example files; `input` is the folder."""
    out = tmp_path / "faces"
    assert prepare_main(["--input", str(photo_dir), "--out", str(out), "--size", "64", "--workers", "1",
                         "--detector", "lbp"]) == 0
    text = capsys.readouterr().out
    assert "3 images in, 1 face crop(s) out" in text and "skipped 2 by reason:" in text
    assert re.search(r"corrupt +1 +truncated or damaged image data .*\(e\.g\. broken\.jpg\)", text), text
    assert re.search(r"no_face +1 +prepare: the detector found no face \(e\.g\. coffee\.jpg\)", text), text
    man = json.loads((out / "manifest.json").read_text())
    entry = man["shards"]["faces-000000.tar"]
    assert man["input"] == entry["input"] == str(photo_dir)
    assert entry["first"].endswith("astronaut.jpg") and entry["last"].endswith("coffee.jpg")


def test_an_input_without_images_names_input(tmp_path, capsys):
    """A folder of .txt files as --input: one line naming --input (not data.path) and what it holds."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    assert prepare_main(["--input", str(tmp_path / "notes"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: --input '{tmp_path / 'notes'}': is a folder with no images") and "1 .txt" in err
    assert "data.path" not in err and not (tmp_path / "o").exists()


def test_detector_help_names_every_choice(capsys):
    """--help lists auto and every registered detector with what it is."""
    with pytest.raises(SystemExit):
        prepare_main(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert "(seemoduledoc)" not in text and "auto=thefirstofmtcnn,lbp" in text
    for entry in detectors.DETECTORS:
        assert "".join(f"{entry.name} = {entry.summary}".split()) in text, entry.name


def test_a_crash_mid_unit_leaves_no_tmp_shard(photo_dir, tmp_path, monkeypatch):
    """An error while a unit is cropped removes its .tmp (the manifest keeps the settings only)."""
    def boom(*a, **k):
        raise RuntimeError("decoder crashed")
    monkeypatch.setattr(prepare_mod, "decode_rgb", boom)
    out = tmp_path / "faces"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        prepare(str(photo_dir), str(out), size=32, workers=1, detector="none")
    assert sorted(os.listdir(out)) == ["manifest.json"]


def test_every_reason_prepare_records_is_in_the_vocabulary():
    """Each literal reason given to `Skips.add` in mcf_fast/data is a key of reasons.SKIP."""
    from mcf_fast.data.reasons import SKIP
    folder = os.path.join(ROOT, "mcf_fast", "data")
    used = set()
    for f in os.listdir(folder):
        if f.endswith(".py"):
            src = open(os.path.join(folder, f)).read()
            used |= {w for pair in re.findall(r'skips\.add\("(\w+)"(?: if .*? else "(\w+)")?', src) for w in pair if w}
    assert {"no_face", "face_too_small", "missing_image", "corrupt_shard"} <= used  # the check sees them
    assert used <= set(SKIP), used - set(SKIP)


def test_an_out_that_is_a_file_is_one_line(photo_dir, tmp_path, capsys):
    """--out naming an existing file: exit 2, one line saying what it is; the file is untouched."""
    (tmp_path / "faces").write_text("keep me")
    assert prepare_main(["--input", str(photo_dir), "--out", str(tmp_path / "faces"), "--detector", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a regular file: give a folder" in err, err
    assert (tmp_path / "faces").read_text() == "keep me"
