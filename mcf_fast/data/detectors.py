"""Where `prepare` gets its face boxes: a registry of detectors, each declared once.

An entry owns its name, a one-line summary (prepare's --help lists them), `missing()` (None when it can
run here, else one line naming the `pip install` that brings what it lacks: asked before anything is
written) and how it finds faces. `auto` is the first of `AUTO` that can run.

  mtcnn  the MTCNN CNN cascade (`mtcnn.py`) with the weights inside the facenet-pytorch wheel
  lbp    scikit-image's LBP frontal-face cascade (scikit-image is part of the base install)
  haar   OpenCV's Haar cascade (OpenCV < 5; OpenCV 5 dropped CascadeClassifier)
  boxes  the boxes of `--boxes FILE` (`boxes.py`), no detector runs
  json   the box stored in each sample's JSON ("face_box" [x, y, w, h] or "bbox" [l, r, t, b])
  none   the image is already a face crop: its central square

On 83 labelled faces in photos that ship in packages (`benchmarks/bench_detect.py`, IoU >= 0.3):
mtcnn recall 0.988 / precision 1.000, haar 0.940 / 0.661, lbp 0.916 / 0.905. `auto` is mtcnn, else
lbp: haar's false detections (one in three) would put non-faces into the pre-training set, so it
runs only when asked for by name.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from mcf_fast.registry import Registry

DETECTORS: Registry = Registry("face detector", "--detector")
AUTO = ("mtcnn", "lbp")
DETECT_MAX_SIDE = 640  # cascades run on a copy at most this big (speed); boxes are scaled back
MTCNN_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"  # --no-deps: it pins an old torch


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


class FaceDetector:
    """Base of the entries: `FaceDetector(min_face, boxes)(rgb, meta, key)` -> [(x, y, w, h)], largest first."""

    name = ""
    summary = ""
    package = ""  # the pip package that brings what it needs ("" = nothing beyond the base install)

    @classmethod
    def missing(cls) -> str | None:
        return None

    def __init__(self, min_face: int, boxes=None):
        self.min_face, self.boxes = min_face, boxes

    def __call__(self, img: np.ndarray, meta: dict | None, key: str = "") -> list:
        raise NotImplementedError


class _Scanning(FaceDetector):
    """A detector that scans pixels: runs on a copy at most DETECT_MAX_SIDE px, loaded on first use."""

    def __init__(self, min_face: int, boxes=None):
        super().__init__(min_face, boxes)
        self._impl = None

    def _load(self):
        raise NotImplementedError

    def _find(self, small: np.ndarray, min_side: int) -> list:
        raise NotImplementedError

    def __call__(self, img, meta, key=""):
        if self._impl is None:
            self._impl = self._load()
        h, w = img.shape[:2]
        f = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = img
        if f < 1:
            from .augment import _resize
            small = _resize(img, max(1, round(w * f)), max(1, round(h * f)))
        found = self._find(small, max(12, int(self.min_face * f * 0.8)))
        boxes = [(x / f, y / f, bw / f, bh / f) for x, y, bw, bh in found]
        return sorted(boxes, key=lambda b: -b[2] * b[3])


@DETECTORS.register
class Mtcnn(_Scanning):
    name = "mtcnn"
    package = "facenet-pytorch"
    summary = "MTCNN CNN cascade, best recall and precision (weights: " + MTCNN_INSTALL + ")"

    @classmethod
    def missing(cls):
        from . import mtcnn
        if mtcnn.available():
            return None
        return f"--detector mtcnn needs the MTCNN weights that ship in the facenet-pytorch wheel: {MTCNN_INSTALL}"

    def _load(self):
        from .mtcnn import MTCNN
        return MTCNN()

    def _find(self, small, min_side):
        return [b[:4] for b in self._impl(small, min_face=min_side)]


@DETECTORS.register
class Lbp(_Scanning):
    name = "lbp"
    package = "scikit-image"
    summary = "scikit-image's LBP frontal-face cascade (base install)"

    @classmethod
    def missing(cls):
        return None if _installed("skimage") else "--detector lbp needs scikit-image: pip install scikit-image"

    def _load(self):
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade
        return Cascade(lbp_frontal_face_cascade_filename())

    def _find(self, small, min_side):
        hs, ws = small.shape[:2]
        side = max(hs, ws)
        dets = self._impl.detect_multi_scale(img=small, scale_factor=1.2, step_ratio=1, min_size=(min_side, min_side),
                                             max_size=(side, side))
        return [(d["c"], d["r"], d["width"], d["height"]) for d in dets]


def _haar_file() -> str:
    import cv2
    return os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), "haarcascade_frontalface_default.xml")


@DETECTORS.register
class Haar(_Scanning):
    name = "haar"
    package = "opencv-python-headless"
    summary = "OpenCV's Haar cascade (needs opencv-python-headless<5; many false detections)"

    @classmethod
    def missing(cls):
        fix = "pip install 'opencv-python-headless<5'"
        if not _installed("cv2"):
            return f"--detector haar needs OpenCV: {fix}"
        import cv2
        if not hasattr(cv2, "CascadeClassifier") or not os.path.exists(_haar_file()):
            return (f"--detector haar needs OpenCV's CascadeClassifier and its XML files, which OpenCV "
                    f"{getattr(cv2, '__version__', '?')} lacks (OpenCV 5 dropped them): {fix}, or use lbp or mtcnn")
        return None

    def _load(self):
        import cv2
        return cv2.CascadeClassifier(_haar_file())

    def _find(self, small, min_side):
        import cv2
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        return [tuple(map(int, b)) for b in self._impl.detectMultiScale(gray, 1.1, 5, minSize=(min_side, min_side))]


@DETECTORS.register
class GivenBoxes(FaceDetector):
    name = "boxes"
    summary = "the boxes of --boxes FILE (LAION-Face's detections, .json/.jsonl/.parquet); no detector runs"

    def __call__(self, img, meta, key=""):
        return self.boxes(key, meta, img.shape)


@DETECTORS.register
class JsonBox(FaceDetector):
    name = "json"
    summary = "the box in each sample's JSON ('face_box' [x, y, w, h] or 'bbox' [l, r, t, b]; synthetic shards)"

    def __call__(self, img, meta, key=""):
        meta = meta or {}
        if "face_box" in meta:
            return [tuple(float(v) for v in meta["face_box"])]
        if "bbox" in meta:
            l, r, t, b = (float(v) for v in meta["bbox"])
            return [(l, t, r - l, b - t)]
        return []


@DETECTORS.register
class WholeImage(FaceDetector):
    name = "none"
    summary = "the images are face crops already: take each one's central square"

    def __call__(self, img, meta, key=""):
        h, w = img.shape[:2]
        s = min(h, w)
        return [((w - s) // 2, (h - s) // 2, s, s)]


def haar_available() -> bool:
    return Haar.missing() is None


def choices() -> tuple[str, ...]:
    return ("auto",) + DETECTORS.names()


def help_text() -> str:
    """prepare's --detector help: every choice with its one line."""
    auto = f"auto = the first of {', '.join(AUTO)} that can run here"
    return "; ".join([auto] + [f"{e.name} = {e.summary}" for e in DETECTORS])


def resolve(name: str, boxes: str = "") -> str:
    """The detector `prepare` will run: `auto` resolved, a named one checked; one-line ValueError otherwise
    (naming the `pip install` that brings a missing piece). Runs before anything is written."""
    if boxes and name not in ("auto", "boxes"):
        raise ValueError(f"--boxes gives the faces: drop --detector {name} (or use --detector boxes)")
    if boxes or name == "boxes":
        if not boxes:
            raise ValueError("--detector boxes needs --boxes FILE (.pth, .json, .jsonl or .parquet of face boxes)")
        return "boxes"
    if name != "auto" and name not in DETECTORS:
        raise ValueError(f"--detector {name!r}: unknown; choose one of {', '.join(choices())}")
    if name == "auto":
        for cand in AUTO:
            if DETECTORS.get(cand).missing() is None:
                return cand
        raise ValueError(f"--detector auto found none of {', '.join(AUTO)}: "
                         + "; ".join(DETECTORS.get(c).missing() for c in AUTO))
    why = DETECTORS.get(name).missing()
    if why:
        raise ValueError(why)
    return name


def Detector(kind: str, min_face: int, boxes=None) -> FaceDetector:
    """The detector of that name, ready to call (loaded on first use)."""
    return DETECTORS.get(kind)(min_face, boxes)
