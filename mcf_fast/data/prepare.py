"""`python -m mcf_fast.data.prepare --input PATH_OR_SHARDS --out DIR`: face crops -> validated shards.

Input: a folder / list file of images, or img2dataset-style shards (`KEY.jpg` + `KEY.json`/`KEY.txt`).
For every image: decode (bad ones skipped and counted by reason), detect faces, keep up to
`--max-faces` of at least `--min-face` px (largest first), grow each box by `--margin` of its side on
every side, make it square (centred), cut it out (edge pixels repeat where the square leaves the
image), resize to `--size` (256: room for 224 training crops), re-encode JPEG at `--quality`.

Output: `OUT/faces-NNNNNN.tar` (one per input unit: an input shard, or `--per-unit` files of a
folder; a unit without any face gets a manifest record marked "empty" and no file), written with
webdataset's TarWriter; each sample `KEY_F.jpg` + `KEY_F.json` ({"source",
"box" [x, y, w, h] in the input image, "input_size" [w, h]}). Every finished shard gets its DALI
index and a manifest entry (counts in/out, skipped by reason, the detector), so it is validated.

Resumable: a unit whose shard is already in the manifest (same size on disk) is not redone; a unit
interrupted mid-way left only a `.tmp` file, which is rewritten. Multi-process over units with a
progress bar. Inputs are read by `inputs.py` through the loader's guarded readers (skip reasons are
`reasons.SKIP`'s); an `--out` that is, contains or lies inside an input folder is refused first.

Detectors (`--detector`): `haar` = OpenCV's Haar cascade (opencv-python-headless < 5 ships it;
OpenCV 5 dropped `CascadeClassifier`), `lbp` = the LBP frontal-face cascade that ships inside
scikit-image (`skimage.data.lbp_frontal_face_cascade_filename()`), `json` = the box stored in the
sample's JSON ("bbox" [left, right, top, bottom] or "face_box" [x, y, w, h]; synthetic shards carry
it), `none` = the image is already a face crop (central square), `mtcnn` = the MTCNN CNN cascade
(`mtcnn.py`; weights from the facenet-pytorch wheel), `boxes` = the boxes of `--boxes FILE`
(`boxes.py`: LAION-Face's released detections, or a JSON/JSONL/parquet table; no detector runs).
`auto` = mtcnn where its weights are installed, else haar, else lbp (recall and precision of each on
labelled photos that ship in packages: `python benchmarks/bench_detect.py`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from .decode import MAX_PIXELS, decode_rgb, resolve_decoder
from .files import MAX_FILE_MB
from .index import MANIFEST, index_written_shard, read_manifest, update_manifest
from .inputs import check_apart, plan_units, unit_inputs
from .reasons import BadSample

DETECT_MAX_SIDE = 640  # detectors run on a copy at most this big (speed); boxes are scaled back


def haar_available() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), "haarcascade_frontalface_default.xml")
    return hasattr(cv2, "CascadeClassifier") and os.path.exists(path)


DETECTORS = ("auto", "mtcnn", "haar", "lbp", "boxes", "json", "none")


def resolve_detector(name: str, boxes: str = "") -> str:
    from . import mtcnn
    if boxes and name not in ("auto", "boxes"):
        raise ValueError(f"--boxes gives the faces: drop --detector {name} (or use --detector boxes)")
    if boxes or name == "boxes":
        if not boxes:
            raise ValueError("--detector boxes needs --boxes FILE (.pth, .json, .jsonl or .parquet of face boxes)")
        return "boxes"
    if name == "auto":
        return "mtcnn" if mtcnn.available() else "haar" if haar_available() else "lbp"
    if name == "haar" and not haar_available():
        raise ValueError("--detector haar needs OpenCV's CascadeClassifier and its XML files "
                         "(opencv-python-headless<5); use --detector mtcnn or lbp (ships with scikit-image)")
    if name == "mtcnn" and not mtcnn.available():
        raise ValueError(f"--detector mtcnn needs its weights: {mtcnn.INSTALL_HINT}")
    if name not in DETECTORS:
        raise ValueError(f"--detector {name!r}: choose one of {', '.join(DETECTORS)}")
    return name


class Detector:
    """Face boxes [(x, y, w, h)] in image pixels, largest first."""

    def __init__(self, kind: str, min_face: int, boxes=None):
        self.kind, self.min_face, self.boxes = kind, min_face, boxes  # boxes: a boxes.GivenBoxes
        self._impl = None

    def _load(self):
        if self.kind == "mtcnn":
            from .mtcnn import MTCNN
            self._impl = MTCNN()
        elif self.kind == "haar":
            import cv2
            self._impl = cv2.CascadeClassifier(
                os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
        elif self.kind == "lbp":
            from skimage.data import lbp_frontal_face_cascade_filename
            from skimage.feature import Cascade
            self._impl = Cascade(lbp_frontal_face_cascade_filename())

    def __call__(self, img: np.ndarray, meta: dict | None, key: str = "") -> list:
        h, w = img.shape[:2]
        if self.kind == "boxes":
            return self.boxes(key, meta, img.shape)
        if self.kind == "none":
            s = min(h, w)
            return [((w - s) // 2, (h - s) // 2, s, s)]
        if self.kind == "json":
            meta = meta or {}
            if "face_box" in meta:
                return [tuple(float(v) for v in meta["face_box"])]
            if "bbox" in meta:
                l, r, t, b = (float(v) for v in meta["bbox"])
                return [(l, t, r - l, b - t)]
            return []
        if self._impl is None:
            self._load()
        f = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = img
        if f < 1:
            from .augment import _resize
            small = _resize(img, max(1, round(w * f)), max(1, round(h * f)))
        m = max(12, int(self.min_face * f * 0.8))
        if self.kind == "haar":
            import cv2
            gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            found = [tuple(map(int, b)) for b in self._impl.detectMultiScale(gray, 1.1, 5, minSize=(m, m))]
        elif self.kind == "mtcnn":
            found = [b[:4] for b in self._impl(small, min_face=m)]
        else:
            hs, ws = small.shape[:2]
            dets = self._impl.detect_multi_scale(img=small, scale_factor=1.2, step_ratio=1, min_size=(m, m),
                                                 max_size=(max(hs, ws), max(hs, ws)))
            found = [(d["c"], d["r"], d["width"], d["height"]) for d in dets]
        boxes = [(x / f, y / f, bw / f, bh / f) for x, y, bw, bh in found]
        return sorted(boxes, key=lambda b: -b[2] * b[3])


def square_crop(img: np.ndarray, box, margin: float, size: int) -> np.ndarray:
    """Square of side max(w, h) * (1 + 2 * margin) centred on the box, resized to size, edge-padded where
    it leaves the image. The part inside the image is resized and the padding added at output scale, so
    a huge box never allocates more than the image and the output (a square padded first would)."""
    from .augment import _resize
    x, y, w, h = box
    side = max(1, int(round(max(w, h) * (1 + 2 * margin))))
    x0, y0 = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
    H, W = img.shape[:2]
    vx0, vy0 = min(max(x0, 0), W - 1), min(max(y0, 0), H - 1)  # the visible part (at least one pixel)
    vx1, vy1 = max(min(x0 + side, W), vx0 + 1), max(min(y0 + side, H), vy0 + 1)
    f = size / side
    ox0, oy0 = min(int(round((vx0 - x0) * f)), size - 1), min(int(round((vy0 - y0) * f)), size - 1)
    ox1, oy1 = max(min(int(round((vx1 - x0) * f)), size), ox0 + 1), max(min(int(round((vy1 - y0) * f)), size), oy0 + 1)
    part = _resize(np.ascontiguousarray(img[vy0:vy1, vx0:vx1]), ox1 - ox0, oy1 - oy0)
    if (ox0, oy0, ox1, oy1) == (0, 0, size, size):
        return part
    return np.pad(part, ((oy0, size - oy1), (ox0, size - ox1), (0, 0)), mode="edge")


def _encode(rgb: np.ndarray, quality: int) -> bytes:
    try:
        import simplejpeg
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")
    except ImportError:
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


_BOX_TABLES: dict = {}  # path -> table, once per process: workers get the path, not a 1 GB dict per unit


def _given_boxes(opts: dict):
    if opts["detector"] != "boxes":
        return None
    from .boxes import GivenBoxes, load_boxes
    path = opts["boxes"]
    if path not in _BOX_TABLES:
        _BOX_TABLES[path] = load_boxes(path)
    return GivenBoxes(_BOX_TABLES[path], opts["box_format"], opts["min_score"])


def process_unit(unit, out_path: str, opts: dict) -> dict:
    """Crop the faces of one unit into out_path (atomic rename); returns its manifest entry."""
    import webdataset as wds
    det = Detector(opts["detector"], opts["min_face"], _given_boxes(opts))
    decoder = resolve_decoder("auto")
    stats, converted, n_in, n_out = Counter(), Counter(), 0, 0
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as fh:
        sink = wds.TarWriter(fh)
        try:
            for key, data, meta in unit_inputs(unit, stats, opts["max_bytes"]):
                n_in += 1
                if data is None:  # why is already counted in stats
                    continue
                try:
                    img, note = decode_rgb(data, decoder, 8, opts["max_pixels"])
                except BadSample as e:
                    stats[e.reason] += 1
                    continue
                if note:
                    converted[note] += 1
                boxes = det(img, meta, key)
                if not boxes:
                    stats["no_face"] += 1
                    continue
                kept = [b for b in boxes if max(b[2], b[3]) >= opts["min_face"]][:opts["max_faces"]]
                if not kept:
                    stats["face_too_small"] += 1
                    continue
                for k, box in enumerate(kept):
                    crop = square_crop(img, box, opts["margin"], opts["size"])
                    info = {"source": key, "box": [round(float(v), 2) for v in box],
                            "input_size": [img.shape[1], img.shape[0]]}
                    sink.write({"__key__": f"{key}_{k}", "jpg": _encode(crop, opts["quality"]),
                                "json": json.dumps(info).encode()})
                    n_out += 1
        except (tarfile.TarError, OSError) as e:
            stats["corrupt_shard"] += 1
            print(f"prepare: {unit[1]} is unreadable past some point ({e}); kept what was read", file=sys.stderr)
        sink.close()
    stats.update(det.boxes.skipped if det.boxes is not None else {})  # given boxes left out (bad_box)
    unit_name = unit[1] if unit[0] == "shard" else f"{len(unit[1])} files from {unit[1][0]}"
    if n_out == 0:  # no faces: no shard file (an empty tar would read as bad data), only the record
        os.remove(tmp)
        for p in (out_path, out_path + ".idx"):
            if os.path.exists(p):
                os.remove(p)
        return {"samples": 0, "size": 0, "empty": True, "skipped_by_reason": dict(stats), "inputs": n_in,
                "faces": 0, "detector": opts["detector"], "validated_by": "prepare", "input": unit_name,
                "converted_by_reason": dict(converted)}
    os.replace(tmp, out_path)
    entry = index_written_shard(out_path, "prepare", dict(stats))
    entry.update({"inputs": n_in, "faces": n_out, "detector": opts["detector"],
                  "input": unit_name, "converted_by_reason": dict(converted)})
    return entry


def prepare(inp: str, out: str, *, size=256, workers=1, margin=0.3, min_face=48, max_faces=1, quality=95,
            detector="auto", per_unit=1000, progress=False, boxes="", box_format="xyxy", min_score=0.0,
            max_file_mb=MAX_FILE_MB, max_pixels=MAX_PIXELS) -> dict:
    check_apart(inp, out)  # first: nothing may be written into (or over) the input
    opts = dict(max_bytes=max_file_mb << 20, max_pixels=max_pixels,
                size=size, margin=margin, min_face=min_face, max_faces=max_faces, quality=quality,
                detector=resolve_detector(detector, boxes), boxes=boxes, box_format=box_format, min_score=min_score)
    if boxes:  # read (and check) the box file once before any work, so a bad one fails at once
        _given_boxes(opts)
    os.makedirs(out, exist_ok=True)
    units, listing = plan_units(inp, per_unit, opts["max_bytes"])
    # left out while listing the input (FIFOs, symlink loops, ...): no unit holds them, the manifest does
    update_manifest(out, {}, input_skipped_by_reason=dict(listing))
    done = read_manifest(out).get("shards", {})
    todo, reused = [], 0
    for u, unit in enumerate(units):
        name = f"faces-{u:06d}.tar"
        p = os.path.join(out, name)
        if name in done and (done[name].get("empty") or (os.path.exists(p) and os.path.getsize(p) == done[name]["size"]
                                                        and os.path.exists(p + ".idx"))):
            reused += 1
        else:
            todo.append((name, unit))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), initial=reused, unit="shard", file=sys.stderr)
    if workers <= 1:  # in-process: no pool start-up (tests, small jobs)
        for name, unit in todo:
            update_manifest(out, {name: process_unit(unit, os.path.join(out, name), opts)})
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(workers) as ex:
            futs = {ex.submit(process_unit, unit, os.path.join(out, name), opts): name for name, unit in todo}
            for fut in as_completed(futs):
                update_manifest(out, {futs[fut]: fut.result()})  # per shard: an interrupted run resumes here
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    man = update_manifest(out, {}, detector=opts["detector"], size=size, margin=margin, min_face=min_face)
    man["reused_units"], man["new_units"] = reused, len(todo)
    return man


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mcf_fast.data.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="folder, list file, or shard pattern of raw images")
    ap.add_argument("--out", required=True, help="output folder for faces-NNNNNN.tar (+ .idx, manifest.json)")
    ap.add_argument("--size", type=int, default=256, help="output crop side (default 256)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--margin", type=float, default=0.3, help="box growth per side, fraction of the box side")
    ap.add_argument("--min-face", type=int, default=48, help="drop faces smaller than this (px, input scale)")
    ap.add_argument("--max-faces", type=int, default=1, help="faces kept per image (largest first)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")
    ap.add_argument("--detector", default="auto", help=" | ".join(DETECTORS) + " (see module doc)")
    ap.add_argument("--boxes", default="", help="face boxes per sample (LAION-Face's sample2detect_N.pth, or "
                                                ".json/.jsonl/.parquet): crop these, run no detector")
    ap.add_argument("--box-format", default="xyxy", choices=("xyxy", "xywh"), help="how --boxes writes a box")
    ap.add_argument("--min-score", type=float, default=0.0, help="--boxes: drop faces scored below this")
    ap.add_argument("--per-unit", type=int, default=1000, help="folder inputs: images per output shard")
    ap.add_argument("--max-file-mb", type=int, default=MAX_FILE_MB, help="skip (too_large) bigger inputs unread")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip (too_large) images whose header "
                                                                         "claims more pixels, undecoded")
    a = ap.parse_args(argv)
    if a.size < 16 or not 0 <= a.margin <= 2 or a.max_faces < 1 or not 1 <= a.quality <= 100:
        ap.error("need --size >= 16, 0 <= --margin <= 2, --max-faces >= 1, 1 <= --quality <= 100")
    if a.max_file_mb < 1 or a.max_pixels < 64:
        ap.error("need --max-file-mb >= 1 and --max-pixels >= 64")
    try:
        man = prepare(a.input, a.out, size=a.size, workers=a.workers, margin=a.margin, min_face=a.min_face,
                      max_faces=a.max_faces, quality=a.quality, detector=a.detector, per_unit=a.per_unit,
                      boxes=a.boxes, box_format=a.box_format, min_score=a.min_score,
                      max_file_mb=a.max_file_mb, max_pixels=a.max_pixels, progress=True)
    except ValueError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 2
    n_in = sum(e.get("inputs", 0) for e in man["shards"].values())
    print(f"{n_in} images in, {man['samples']} face crops out, in {len(man['shards'])} shard(s) "
          f"({man['reused_units']} already done); skipped: {man['skipped_by_reason'] or 'none'}"
          + (f"; left out of the input listing: {man['input_skipped_by_reason']}"
             if man.get("input_skipped_by_reason") else ""))
    print(f"manifest: {os.path.join(a.out, MANIFEST)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
