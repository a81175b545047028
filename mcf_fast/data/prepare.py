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
interrupted mid-way left only a `.tmp` file, which is rewritten. The settings are recorded in the
manifest before the first unit, and a rerun into the same `--out` with other settings (size, margin,
detector, ...) is refused in one line (`prepare_record.py`). Multi-process over units with a progress
bar. Inputs are recognised by the data source registry and read by `inputs.py` through the loader's
guarded readers (skip reasons are `reasons.SKIP`'s); an `--out` that is, contains or lies inside an
input folder is refused first. The closing summary lists what was skipped, by reason, with examples.

Detectors (`--detector`, `detectors.py`): mtcnn, lbp, haar, boxes, json, none; `auto` = mtcnn where its
weights are installed, else lbp (scikit-image, part of the base install). A detector that cannot run
here is one line naming the `pip install` that brings it, before anything is written.
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

from . import detectors
from .decode import MAX_PIXELS, decode_rgb, resolve_decoder
from .detectors import Detector, haar_available  # noqa: F401 (benchmarks/bench_detect.py imports them here)
from .files import MAX_FILE_MB
from .index import index_written_shard, read_manifest, update_manifest
from .inputs import Skips, check_apart, plan_units, unit_inputs
from .prepare_record import check_resume, settings, summary
from .probe import describe
from .reasons import BadSample


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
    tmp = out_path + ".tmp"
    try:
        n_in, n_out, skips, converted = _crop_unit(unit, tmp, opts)
    except BaseException:
        if os.path.exists(tmp):  # a crash or Ctrl-C mid-unit leaves no half-written shard behind
            os.remove(tmp)
        raise
    entry = {"inputs": n_in, "faces": n_out, "detector": opts["detector"], "converted_by_reason": dict(converted),
             "skipped_examples": skips.examples}
    entry.update(_unit_source(unit, opts["input"]))
    if n_out == 0:  # no faces: no shard file (an empty tar would read as bad data), only the record
        os.remove(tmp)
        for p in (out_path, out_path + ".idx"):
            if os.path.exists(p):
                os.remove(p)
        return {"samples": 0, "size": 0, "empty": True, "skipped_by_reason": dict(skips.counts),
                "validated_by": "prepare", **entry}
    os.replace(tmp, out_path)
    return {**index_written_shard(out_path, "prepare", dict(skips.counts)), **entry}


def _unit_source(unit, inp: str) -> dict:
    """Where a unit came from: its input shard, or the --input folder / list and its first and last file."""
    kind, spec = unit
    if kind == "shard":
        return {"input": os.path.abspath(spec)}
    return {"input": os.path.abspath(inp), "first": spec[0], "last": spec[-1]}


def _crop_unit(unit, tmp: str, opts: dict):
    import webdataset as wds
    det = Detector(opts["detector"], opts["min_face"], _given_boxes(opts))
    decoder = resolve_decoder("auto")
    skips, converted, n_in, n_out = Skips(), Counter(), 0, 0
    with open(tmp, "wb") as fh:
        sink = wds.TarWriter(fh)
        try:
            for key, data, meta, name in unit_inputs(unit, skips, opts["max_bytes"]):
                n_in += 1
                if data is None:  # why is already in skips
                    continue
                try:
                    img, note = decode_rgb(data, decoder, 8, opts["max_pixels"])
                except BadSample as e:
                    skips.add(e.reason, name)
                    continue
                if note:
                    converted[note] += 1
                boxes = det(img, meta, key)
                kept = [b for b in boxes if max(b[2], b[3]) >= opts["min_face"]][:opts["max_faces"]]
                if not kept:
                    skips.add("face_too_small" if boxes else "no_face", name)
                    continue
                for k, box in enumerate(kept):
                    crop = square_crop(img, box, opts["margin"], opts["size"])
                    info = {"source": key, "box": [round(float(v), 2) for v in box],
                            "input_size": [img.shape[1], img.shape[0]]}
                    sink.write({"__key__": f"{key}_{k}", "jpg": _encode(crop, opts["quality"]),
                                "json": json.dumps(info).encode()})
                    n_out += 1
        except (tarfile.TarError, OSError) as e:
            skips.add("corrupt_shard", str(unit[1]))
            print(f"prepare: {unit[1]} is unreadable past some point ({e}); kept what was read", file=sys.stderr)
        sink.close()
    if det.boxes is not None:  # given boxes left out (bad_box: not finite, or empty once clipped)
        skips.update(det.boxes.skipped)
    return n_in, n_out, skips, converted


def prepare(inp: str, out: str, *, size=256, workers=1, margin=0.3, min_face=48, max_faces=1, quality=95,
            detector="auto", per_unit=1000, progress=False, boxes="", box_format="xyxy", min_score=0.0,
            max_file_mb=MAX_FILE_MB, max_pixels=MAX_PIXELS) -> dict:
    """Crop the faces of `inp` into validated shards in `out` (see the module docstring); returns the
    manifest, with `reused_units` and `new_units` added. Every check runs before anything is written."""
    check_apart(inp, out)  # first: nothing may be written into (or over) the input
    opts = dict(max_bytes=max_file_mb << 20, max_pixels=max_pixels, input=inp,
                size=size, margin=margin, min_face=min_face, max_faces=max_faces, quality=quality,
                detector=detectors.resolve(detector, boxes), boxes=boxes, box_format=box_format, min_score=min_score)
    if boxes:  # read (and check) the box file once before any work, so a bad one fails at once
        _given_boxes(opts)
    units, listing = plan_units(inp, per_unit, opts["max_bytes"])
    made_with = settings(inp, opts, per_unit, max_file_mb)
    check_resume(out, made_with)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is {describe(out)}: give a folder (it is created when missing)")
    try:
        os.makedirs(out, exist_ok=True)
        # left out while listing the input (FIFOs, symlink loops, ...): no unit holds them, the manifest does
        update_manifest(out, {}, settings=made_with, input=made_with["input"], input_skipped_by_reason=dict(listing))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}): give a writable folder") from None
    done = read_manifest(out).get("shards", {})
    todo = [(f"faces-{u:06d}.tar", unit) for u, unit in enumerate(units) if not _done(out, f"faces-{u:06d}.tar", done)]
    reused = len(units) - len(todo)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), initial=reused, unit="shard", file=sys.stderr)
    for name, entry in _run_units(todo, out, opts, workers):
        update_manifest(out, {name: entry})  # per shard: an interrupted run resumes here
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    man = read_manifest(out)
    man["reused_units"], man["new_units"] = reused, len(todo)
    return man


def _done(out: str, name: str, done: dict) -> bool:
    """A unit is done when its record is there and, unless it found no face, its shard and index too."""
    if name not in done:
        return False
    p = os.path.join(out, name)
    return bool(done[name].get("empty")) or (os.path.exists(p) and os.path.getsize(p) == done[name]["size"]
                                             and os.path.exists(p + ".idx"))


def _run_units(todo: list, out: str, opts: dict, workers: int):
    """Yield (shard name, manifest entry) as units finish: in-process for one worker (no pool start-up),
    else over a process pool."""
    if workers <= 1:
        for name, unit in todo:
            yield name, process_unit(unit, os.path.join(out, name), opts)
        return
    with ProcessPoolExecutor(workers) as ex:
        futs = {ex.submit(process_unit, unit, os.path.join(out, name), opts): name for name, unit in todo}
        for fut in as_completed(futs):
            yield futs[fut], fut.result()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mcf_fast.data.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="folder, list file, or shard pattern of raw images")
    ap.add_argument("--out", required=True, help="output folder for faces-NNNNNN.tar (+ .idx, manifest.json)")
    ap.add_argument("--size", type=int, default=256, help="output crop side (default 256)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--margin", type=float, default=0.3, help="box growth per side, fraction of the box side")
    ap.add_argument("--min-face", type=int, default=48, help="drop faces smaller than this (px, input scale)")
    ap.add_argument("--max-faces", type=int, default=1, help="faces kept per image (largest first)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")
    ap.add_argument("--detector", default="auto", metavar="{" + ",".join(detectors.choices()) + "}",
                    help=detectors.help_text() + " (default: auto)")
    ap.add_argument("--boxes", default="", help="face boxes per sample (LAION-Face's sample2detect_N.pth, or "
                                                ".json/.jsonl/.parquet): crop these, run no detector")
    ap.add_argument("--box-format", default="xyxy", choices=("xyxy", "xywh"), help="how --boxes writes a box")
    ap.add_argument("--min-score", type=float, default=0.0, help="--boxes: drop faces scored below this")
    ap.add_argument("--per-unit", type=int, default=1000, help="folder inputs: images per output shard")
    ap.add_argument("--max-file-mb", type=int, default=MAX_FILE_MB, help="skip (too_large) bigger inputs unread")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip (too_large) images whose header "
                                                                         "claims more pixels, undecoded")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.size < 16 or not 0 <= a.margin <= 2 or a.max_faces < 1 or not 1 <= a.quality <= 100:
        ap.error("need --size >= 16, 0 <= --margin <= 2, --max-faces >= 1, 1 <= --quality <= 100")
    if a.max_file_mb < 1 or a.max_pixels < 64 or a.per_unit < 1:
        ap.error("need --max-file-mb >= 1, --max-pixels >= 64 and --per-unit >= 1")
    try:
        man = prepare(a.input, a.out, size=a.size, workers=a.workers, margin=a.margin, min_face=a.min_face,
                      max_faces=a.max_faces, quality=a.quality, detector=a.detector, per_unit=a.per_unit,
                      boxes=a.boxes, box_format=a.box_format, min_score=a.min_score,
                      max_file_mb=a.max_file_mb, max_pixels=a.max_pixels, progress=True)
    except ValueError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(man, a.input, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
