"""Readers for the real on-disk layouts of the downstream sets (see docs/METHOD.md §12).

AFLW-19: `DIR/AFLWinfo_release.mat` (bbox N x 4 = left, right, top, bottom; data N x 38 = x1..x19,
y1..y19; mask_new N x 19; nameList N x 1 cell of paths under `DIR/data/flickr/`; ra = 1-based
permutation). Train = the first 20,000 faces of `ra`, test = the rest (4,386), frontal = test faces
with all 19 points visible. Sets with fewer than 24,386 faces (synthetic ones) need their own split
size: `train_count` (CLI `--train-count`), else `DIR/split.json` {"train_count": K}, else the real
rule's proportion, floor(N * 20000 / 24386).

LaPa: `DIR/{train,val,test}/images/*.jpg` with `labels/<stem>.png` (class index per pixel, 0..10)
and `landmarks/<stem>.txt` (106, then 106 x,y pairs; FaRL's protocol aligns the face with five of them).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

AFLW_MAT = "AFLWinfo_release.mat"
AFLW_TOTAL, AFLW_TRAIN = 24386, 20000
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class FaceRecord:
    """One face: the image file, its box (left, right, top, bottom) and 19 (x, y) points (alignment)."""
    image: str
    box: np.ndarray            # [4] float64, left, right, top, bottom
    landmarks: np.ndarray      # [19, 2] float64
    visible: np.ndarray        # [19] bool


@dataclass
class ParsingRecord:
    """One LaPa image, its label map file and its 106-point landmarks file ("" when there is none)."""
    image: str
    label: str
    landmarks: str = ""


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _cell_strings(cells) -> list[str]:
    """nameList as scipy reads a MATLAB cell column (object array of 1-element arrays) or a char matrix."""
    arr = np.asarray(cells)
    if arr.dtype.kind in "US":
        return [str(s).strip() for s in arr.reshape(-1)]
    out = []
    for c in arr.reshape(-1):
        v = np.asarray(c).reshape(-1)
        out.append(str(v[0]).strip() if v.size else "")
    return out


def aflw_train_count(root: str, num_faces: int, train_count: int | None = None) -> int:
    """How many faces of `ra` (in order) train; the rest test. See the module docstring for the rule."""
    if train_count is None:
        sidecar = os.path.join(root, "split.json")
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                train_count = json.load(f).get("train_count")
            if train_count is None:
                raise ValueError(f"{sidecar} has no 'train_count' key")
        elif num_faces >= AFLW_TOTAL:
            train_count = AFLW_TRAIN
        else:
            train_count = num_faces * AFLW_TRAIN // AFLW_TOTAL
            log.info("AFLW-19 set of %d faces (< %d): training on the first %d of ra (real rule's proportion)",
                     num_faces, AFLW_TOTAL, train_count)
    train_count = int(train_count)
    if not 0 < train_count < num_faces:
        raise ValueError(f"train_count {train_count} leaves no train or no test faces out of {num_faces}; "
                         "pass --train-count between 1 and N-1")
    return train_count


def read_aflw19(root: str, split: str, train_count: int | None = None,
                check_images: bool = True) -> list[FaceRecord]:
    """Faces of one split ('train', 'test' = full test set, 'frontal') in `ra` order."""
    if split not in ("train", "test", "frontal"):
        raise ValueError(f"AFLW-19 split must be 'train', 'test' or 'frontal', got {split!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"AFLW-19 folder not found: {root} (expected it to hold {AFLW_MAT} and data/flickr/)")
    mat_path = _need(os.path.join(root, AFLW_MAT), "AFLW-19 annotation file")
    import scipy.io
    try:
        info = scipy.io.loadmat(mat_path)
    except NotImplementedError as e:  # MATLAB v7.3 files are HDF5, which scipy cannot read
        raise ValueError(f"{mat_path} is a MATLAB v7.3 (HDF5) file; save it as v5 (-v7) for scipy") from e
    for key in ("bbox", "data", "mask_new", "nameList", "ra"):
        if key not in info:
            raise KeyError(f"{mat_path} lacks the variable {key!r} (has {sorted(k for k in info if not k.startswith('__'))})")
    bbox = np.asarray(info["bbox"], np.float64)
    data = np.asarray(info["data"], np.float64)
    vis = np.asarray(info["mask_new"]) != 0
    names = _cell_strings(info["nameList"])
    n = bbox.shape[0]
    if bbox.shape != (n, 4) or data.shape != (n, 38) or vis.shape != (n, 19) or len(names) != n:
        raise ValueError(f"{mat_path}: inconsistent shapes bbox {bbox.shape}, data {data.shape}, "
                         f"mask_new {vis.shape}, nameList {len(names)} (expected N x 4, N x 38, N x 19, N)")
    ra = np.asarray(info["ra"]).reshape(-1).astype(np.int64) - 1
    if sorted(ra.tolist()) != list(range(n)):
        raise ValueError(f"{mat_path}: 'ra' is not a 1-based permutation of 1..{n}")
    k = aflw_train_count(root, n, train_count)
    idx = ra[:k] if split == "train" else ra[k:]
    if split == "frontal":
        idx = idx[vis[idx].all(axis=1)]
    img_root = os.path.join(root, "data", "flickr")
    recs = [FaceRecord(os.path.join(img_root, names[i]), bbox[i].copy(),
                       np.stack([data[i, :19], data[i, 19:]], axis=1), vis[i].copy()) for i in idx]
    if check_images:
        missing = [r.image for r in recs if not os.path.exists(r.image)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} AFLW-19 images listed in nameList are missing under "
                                    f"{img_root}, e.g. {missing[:3]}")
    return recs


def read_lapa(root: str, split: str) -> list[ParsingRecord]:
    """Images of one LaPa split ('train', 'val', 'test') with their label maps, sorted by name."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"LaPa split must be 'train', 'val' or 'test', got {split!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"LaPa folder not found: {root} (expected train/, val/, test/ inside)")
    sdir = os.path.join(root, split)
    img_dir, lab_dir = os.path.join(sdir, "images"), os.path.join(sdir, "labels")
    _need(img_dir, f"LaPa {split} images folder")
    _need(lab_dir, f"LaPa {split} labels folder")
    stems = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(IMAGE_EXTS))
    if not stems:
        raise FileNotFoundError(f"no images (*.jpg / *.png) in {img_dir}")
    recs, missing = [], []
    for f in stems:
        lab = os.path.join(lab_dir, os.path.splitext(f)[0] + ".png")
        if not os.path.exists(lab):
            missing.append(lab)
        lm = os.path.join(sdir, "landmarks", os.path.splitext(f)[0] + ".txt")
        recs.append(ParsingRecord(os.path.join(img_dir, f), lab, lm if os.path.exists(lm) else ""))
    if missing:
        raise FileNotFoundError(f"{len(missing)} LaPa label maps are missing, e.g. {missing[:3]}")
    return recs


def read_lapa_landmarks(path: str) -> np.ndarray:
    """[106, 2] points of a LaPa landmarks file (first number 106, then x y pairs)."""
    with open(_need(path, "LaPa landmarks file")) as f:
        vals = f.read().split()
    if not vals or int(float(vals[0])) * 2 != len(vals) - 1:
        raise ValueError(f"{path}: expected a count then that many x y pairs, got {len(vals)} numbers")
    return np.asarray(vals[1:], np.float64).reshape(-1, 2)
