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
"""
from __future__ import annotations

import json
import os

import numpy as np

BOX_FORMATS = ("xyxy", "xywh")


def _load_pth(path: str):
    from mcf_fast.safe_load import safe_torch_load
    try:
        return safe_torch_load(path, arrays=True)
    except ValueError as e:  # it names the refused globals; say which option the file came from
        raise ValueError(f"--boxes {path}: not a weights-only box file ({str(e)[:300]}); "
                         "only dicts of numbers, lists and numpy arrays are read") from None


def _records_table(path: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"--boxes {path}: reading parquet needs pyarrow (pip install pyarrow), "
                         "or give the boxes as .json / .jsonl") from None
    return pq.read_table(path).to_pylist()


def _from_records(rows, path: str) -> dict:
    out = {}
    for i, r in enumerate(rows):
        key = r.get("SAMPLE_ID", r.get("key"))
        boxes = r.get("boxes", r.get("box"))
        if key is None or boxes is None:
            raise ValueError(f"--boxes {path}: record {i} needs a 'key' (or 'SAMPLE_ID') and 'boxes' (or 'box'); "
                             f"it has {sorted(r)}")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = r.get("scores", r.get("score"))
        scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
        out[str(key)] = [(b, s) for b, s in zip(boxes, scores)]
    return out


def _normalise_entry(v) -> list:
    """One sample's value -> [(box[4], score)]; accepts (box, landmarks, score) triples or flat rows."""
    faces = []
    for face in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(face, (list, tuple)) and len(face) == 3 and np.size(face[0]) == 4:
            faces.append((np.asarray(face[0], dtype=np.float64).reshape(4), float(np.asarray(face[2]))))
        else:
            row = np.asarray(face, dtype=np.float64).reshape(-1)
            if row.size not in (4, 5):
                raise ValueError(f"a face entry must be 4 box numbers (+ score), got {row.size}")
            faces.append((row[:4], float(row[4]) if row.size == 5 else 1.0))
    return faces


def load_boxes(path: str) -> dict:
    """{str key: [(box [4] as written, score)]} from a box file (see module doc)."""
    if not os.path.isfile(path):
        raise ValueError(f"--boxes {path} does not exist (a .pth, .json, .jsonl or .parquet of face boxes)")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt"):
        raw = _load_pth(path)
    elif ext == ".json":
        with open(path) as f:
            raw = json.load(f)
    elif ext == ".jsonl":
        with open(path) as f:
            return _from_records((json.loads(line) for line in f if line.strip()), path)
    elif ext == ".parquet":
        return _from_records(_records_table(path), path)
    else:
        raise ValueError(f"--boxes {path}: unknown extension {ext!r} (use .pth, .json, .jsonl or .parquet)")
    if not isinstance(raw, dict):
        raise ValueError(f"--boxes {path}: expected a dict of sample key -> boxes, got {type(raw).__name__}")
    try:
        return {str(k): _normalise_entry(v) for k, v in raw.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f"--boxes {path}: {e}") from None


class GivenBoxes:
    """Boxes [(x, y, w, h)] of one sample from a loaded box file, largest first (as every detector's)."""

    def __init__(self, table: dict, box_format: str = "xyxy", min_score: float = 0.0):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"--box-format {box_format!r}: choose one of {', '.join(BOX_FORMATS)}")
        self.table, self.box_format, self.min_score = table, box_format, min_score

    def lookup(self, key: str, meta: dict | None) -> list:
        meta = meta or {}
        for k in (meta.get("SAMPLE_ID"), meta.get("key"), key):
            if k is not None and str(k) in self.table:
                return self.table[str(k)]
        return []

    def __call__(self, key: str, meta: dict | None, shape) -> list:
        H, W = shape[:2]
        out = []
        for box, score in self.lookup(key, meta):
            if score < self.min_score:
                continue
            x, y, a, b = (float(v) for v in box)
            w, h = (a - x, b - y) if self.box_format == "xyxy" else (a, b)
            if w > 0 and h > 0 and x < W and y < H and x + w > 0 and y + h > 0:  # inside the image at all
                out.append((x, y, w, h))
        return sorted(out, key=lambda b: -b[2] * b[3])
