"""Face boxes given per sample (`prepare --boxes FILE`): crop LAION-Face as released, with no detector.

LAION-Face ships its detections (batch-face's RetinaFace) as `sample2detect_{part}.pth`: a dict
`{int SAMPLE_ID: [(box [x1, y1, x2, y2], landmarks [5, 2], score), ...]}` of numpy values, one file
per download part; img2dataset writes `SAMPLE_ID` into every sample's JSON (LAION-Face's download.sh
saves that column). Other tools write tables. Accepted here:
- `.pth` / `.pt`: that dict (or `{key: [[x1, y1, x2, y2, score?], ...]}`), read weights-only with
  exactly numpy's array/scalar/dtype rebuild functions allowed (`mcf_fast.safe_load`), so a hostile
  file cannot run code;
- `.json`: `{key: boxes}`; `.jsonl`: one `{"key" | "SAMPLE_ID": ..., "boxes" | "box": ..., "scores"?}`
  per line; `.parquet` (needs pyarrow): the same columns.
Boxes are `[x1, y1, x2, y2]` corners by default (RetinaFace, LAION-Face) or `--box-format xywh`, in
the pixels of the image as stored. A sample is matched by its JSON's `SAMPLE_ID`, then its JSON's
`key`, then its file key; a sample with no entry counts as `no_face`.

Values are checked as numbers before anything is built from them: a face is 4 plain numbers (+ a
score) or (box, landmarks, score), never an arbitrary nesting handed to `np.asarray` (a 1.4 KB pickle
of shared tuples would expand to 3^19 floats); a file that is not that is refused with one line
(deep JSON, a JSONL line `5`, a 5000-digit number included). At crop time a box that is not finite,
or empty once clipped to its image, is skipped and counted as `bad_box`; the others are clipped to the
image, so the crop around them is never larger than the image allows (`square_crop` pads after
resizing).
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

BOX_FORMATS = ("xyxy", "xywh")
_NUMBER = (int, float, np.integer, np.floating)


def _load_pth(path: str):
    from mcf_fast.safe_load import safe_torch_load
    try:
        return safe_torch_load(path, arrays=True)
    except ValueError as e:  # it names the refused globals; say which option the file came from
        raise ValueError(f"--boxes {path}: not a weights-only box file ({str(e)[:300]}); "
                         "only dicts of numbers, lists and numpy arrays are read") from None


def _load_json(path: str, lines: bool):
    """The parsed .json (or the records of a .jsonl); every failure a ValueError naming the line."""
    with open(path) as f:
        if not lines:
            return json.load(f)
        out = []
        for i, line in enumerate(f):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"line {i + 1} is a {type(rec).__name__}, not an object "
                                     "{\"key\": ..., \"boxes\": ...}")
                out.append(rec)
        return out


def _records_table(path: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"--boxes {path}: reading parquet needs pyarrow (pip install pyarrow), "
                         "or give the boxes as .json / .jsonl") from None
    return pq.read_table(path).to_pylist()


def _numbers(x, sizes: tuple) -> np.ndarray | None:
    """A flat float64 vector from plain numbers (a list, tuple, numpy or torch array) whose count is one
    of `sizes`; None when `x` is anything else (nothing nested is ever expanded)."""
    if isinstance(x, _NUMBER) and not isinstance(x, bool) and 1 in sizes:
        return np.array([x], np.float64)
    if isinstance(x, (list, tuple)):
        if len(x) in sizes and all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in x):
            return np.array(x, np.float64)
        return None
    if hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) <= 2:  # numpy or torch
        a = np.asarray(x)
        return a.astype(np.float64).reshape(-1) if a.dtype.kind in "iuf" and a.size in sizes else None
    return None


def _face(face) -> tuple:
    """One face -> (box[4] as written, score): (box, landmarks, score) as LAION-Face, or 4-5 numbers."""
    if isinstance(face, (list, tuple)) and len(face) == 3:
        box, score = _numbers(face[0], (4,)), _numbers(face[2], (1,))
        if box is not None and score is not None:
            return box, float(score[0])
    row = _numbers(face, (4, 5))
    if row is None:
        raise ValueError("a face entry must be 4 box numbers (+ score) or (box, landmarks, score), "
                         f"got a {type(face).__name__}")
    return row[:4], float(row[4]) if row.size == 5 else 1.0


def _normalise_entry(v) -> list:
    """One sample's value -> [(box[4], score)]: a list of faces, one face, or an [N, 4|5] array."""
    if hasattr(v, "shape") and len(v.shape) == 2:
        v = list(v)
    if isinstance(v, (list, tuple)) and not (v and isinstance(v[0], _NUMBER)):
        return [_face(f) for f in v]
    return [_face(v)]


def _from_records(rows, path: str) -> dict:
    out = {}
    for i, r in enumerate(rows):
        key = r.get("SAMPLE_ID", r.get("key"))
        boxes = r.get("boxes", r.get("box"))
        if key is None or boxes is None:
            raise ValueError(f"record {i} needs a 'key' (or 'SAMPLE_ID') and 'boxes' (or 'box'); it has {sorted(r)}")
        one = _numbers(boxes, (4,))
        rows_ = [one] if one is not None else [_numbers(b, (4,)) for b in boxes] if isinstance(boxes, list) else [None]
        if any(b is None for b in rows_):
            raise ValueError(f"record {i}: 'boxes' must be [x1, y1, x2, y2] or a list of them")
        scores = r.get("scores", r.get("score"))
        sc = [1.0] * len(rows_) if scores is None else _numbers(scores, (len(rows_),))
        if sc is None:
            raise ValueError(f"record {i}: 'scores' must be {len(rows_)} number(s), one per box")
        out[str(key)] = [(b, float(s)) for b, s in zip(rows_, sc)]
    return out


def _read(path: str, ext: str) -> dict:
    if ext in (".jsonl", ".parquet"):
        return _from_records(_load_json(path, True) if ext == ".jsonl" else _records_table(path), path)
    raw = _load_pth(path) if ext in (".pth", ".pt") else _load_json(path, False)
    if not isinstance(raw, dict):
        raise ValueError(f"expected a dict of sample key -> boxes, got {type(raw).__name__}")
    return {str(k): _normalise_entry(v) for k, v in raw.items()}


def load_boxes(path: str) -> dict:
    """{str key: [(box [4] as written, score)]} from a box file (see module doc); a ValueError with one
    line naming the file and what is wrong otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"--boxes {path} does not exist (a .pth, .json, .jsonl or .parquet of face boxes)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pth", ".pt", ".json", ".jsonl", ".parquet"):
        raise ValueError(f"--boxes {path}: unknown extension {ext!r} (use .pth, .json, .jsonl or .parquet)")
    try:
        return _read(path, ext)
    except RecursionError:
        raise ValueError(f"--boxes {path}: nested too deeply to be a box file") from None
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as e:
        msg = str(e) if str(e).startswith("--boxes") else f"--boxes {path}: {(str(e).splitlines() or [''])[0][:300]}"
        raise ValueError(msg) from None


class GivenBoxes:
    """Boxes [(x, y, w, h)] of one sample from a loaded box file, largest first (as every detector's),
    clipped to the image; `skipped` counts the faces left out (`bad_box`: not finite, or empty once
    clipped), for the caller's per-unit statistics."""

    def __init__(self, table: dict, box_format: str = "xyxy", min_score: float = 0.0):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"--box-format {box_format!r}: choose one of {', '.join(BOX_FORMATS)}")
        self.table, self.box_format, self.min_score = table, box_format, min_score
        self.skipped: Counter = Counter()

    def lookup(self, key: str, meta: dict | None) -> list:
        meta = meta if isinstance(meta, dict) else {}
        for k in (meta.get("SAMPLE_ID"), meta.get("key"), key):
            if isinstance(k, (str, int)) and str(k) in self.table:
                return self.table[str(k)]
        return []

    def clip(self, box, shape) -> tuple | None:
        """(x, y, w, h) of a finite box clipped to an image of `shape`; None when nothing is left."""
        H, W = shape[:2]
        x, y, a, b = (float(v) for v in box)
        if not np.isfinite([x, y, a, b]).all():
            return None
        x2, y2 = (a, b) if self.box_format == "xyxy" else (x + a, y + b)
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(W), x2), min(float(H), y2)
        return (x1, y1, x2 - x1, y2 - y1) if x2 - x1 >= 1 and y2 - y1 >= 1 else None

    def __call__(self, key: str, meta: dict | None, shape) -> list:
        out = []
        for box, score in self.lookup(key, meta):
            if not np.isfinite(score):
                self.skipped["bad_box"] += 1
                continue
            if score < self.min_score:
                continue
            clipped = self.clip(box, shape)
            if clipped is None:
                self.skipped["bad_box"] += 1
            else:
                out.append(clipped)
        return sorted(out, key=lambda b: -b[2] * b[3])
