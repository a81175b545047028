"""Face detectors of `prepare` on labelled real photos that ship in packages: recall, precision, time.

`python -m benchmarks.bench_detect [--composites 40] [--out DIR]`

The set (nothing downloaded):
- three portraits with hand-drawn face boxes: scikit-image's `astronaut` and `camera`, matplotlib's
  `grace_hopper.jpg` (boxes drawn on a 50 px grid, brow to chin and ear to ear);
- scikit-image's negatives (cat, coffee, coins, rocket, horse, ...), where every detection is false;
- composites: a negative photo with two of scikit-image's `lfw_subset` faces (real LFW photos, tight
  25 px crops) and two of its non-face patches pasted at random places and sizes (56-128 px); the
  pasted face squares are the labels.
A detection matches a label at IoU >= 0.3 (the labels of tight crops and a detector's box differ in
how much forehead and chin they take); each label matches at most once.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.bench_detect\n")
    raise SystemExit(2)

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from .cli import Parser  # noqa: E402
from .harness import measure  # noqa: E402

PORTRAITS = {"astronaut": [(180, 60, 90, 115)], "camera": [(190, 105, 60, 85)],
             "grace_hopper": [(160, 110, 200, 225)]}
NEGATIVES = ("chelsea", "coffee", "coins", "rocket", "horse", "hubble_deep_field", "immunohistochemistry",
             "page", "retina", "text", "brick", "grass", "gravel")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0, 1) * 255 if a.max() <= 1 else np.clip(a, 0, 255)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def _portrait(name: str) -> np.ndarray:
    if name == "grace_hopper":
        import matplotlib
        from PIL import Image
        path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
        return np.asarray(Image.open(path).convert("RGB"))
    import skimage.data
    return _rgb(getattr(skimage.data, name)())


def labelled_set(n_composites: int, seed: int = 0) -> list:
    """[(name, rgb uint8, [(x, y, w, h)] labels)]."""
    import skimage.data

    from mcf_fast.data.augment import _resize
    out = [(n, _portrait(n), boxes) for n, boxes in PORTRAITS.items()]
    negs = [(n, _rgb(getattr(skimage.data, n)())) for n in NEGATIVES]
    out += [(n, img, []) for n, img in negs]
    lfw = (skimage.data.lfw_subset() * 255).astype(np.uint8)  # 100 faces, then 100 non-faces
    rng = np.random.default_rng(seed)
    for c in range(n_composites):
        bg = _resize(negs[c % len(negs)][1], 480, 480).copy()
        labels, taken = [], []
        for j, idx in enumerate((rng.integers(0, 100), rng.integers(0, 100), rng.integers(100, 200),
                                 rng.integers(100, 200))):
            for _ in range(50):  # a free place: pasted squares never overlap
                s = int(rng.integers(56, 129))
                x, y = int(rng.integers(0, 480 - s)), int(rng.integers(0, 480 - s))
                if all(x + s <= a or a + b <= x or y + s <= c2 or c2 + b <= y for a, c2, b in taken):
                    break
            taken.append((x, y, s))
            bg[y:y + s, x:x + s] = _rgb(_resize(lfw[idx], s, s))
            if j < 2:
                labels.append((x, y, s, s))
        out.append((f"composite_{c:02d}", bg, labels))
    return out


def iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w, h = max(0.0, min(ax2, bx2) - max(a[0], b[0])), max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def score(dets: list, labels: list, thresh: float = 0.3) -> tuple[int, int, int]:
    """(true positives, detections, labels): greedy one-to-one matching at IoU >= thresh."""
    free, tp = list(labels), 0
    for d in dets:
        best = max(free, key=lambda g: iou(d, g), default=None)
        if best is not None and iou(d, best) >= thresh:
            free.remove(best)
            tp += 1
    return tp, len(dets), len(labels)


def evaluate(kind: str, data: list, min_face: int = 40) -> dict:
    """Recall and precision of one detector over `data`, and its seconds per image (the harness's clock,
    one pass over the set: every image is detected once, as `prepare` would)."""
    from mcf_fast.data.prepare import Detector
    det = Detector(kind, min_face)
    found = []
    ms = measure({kind: lambda: found.extend(det(img, None) for _, img, _ in data)}, warmup=0, reps=1)[kind][0]
    tp = nd = ng = 0
    for dets, (_, _, labels) in zip(found, data):
        a, b, c = score(dets, labels)
        tp, nd, ng = tp + a, nd + b, ng + c
    return {"detector": kind, "recall": tp / max(ng, 1), "precision": tp / max(nd, 1), "true_pos": tp,
            "detections": nd, "faces": ng, "images": len(data), "s_per_image": ms / 1e3 / len(data)}


def main(argv=None) -> int:
    ap = Parser(__doc__, "python -m benchmarks.bench_detect")
    ap.add_argument("--composites", type=int, default=40)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    from mcf_fast.data import mtcnn
    from mcf_fast.data.prepare import haar_available
    data = labelled_set(a.composites)
    kinds = [k for k, ok in (("mtcnn", mtcnn.available()), ("haar", haar_available()), ("lbp", True)) if ok]
    rows = [evaluate(k, data) for k in kinds]
    lines = ["| detector | recall | precision | TP / detections / faces | s per image |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['detector']} | {r['recall']:.3f} | {r['precision']:.3f} | {r['true_pos']} / {r['detections']} / "
              f"{r['faces']} | {r['s_per_image']:.2f} |" for r in rows]
    print(f"{len(data)} images, {rows[0]['faces']} labelled faces")
    print("\n".join(lines))
    if not haar_available():
        print("haar: not measured (this OpenCV has no CascadeClassifier: OpenCV 5 removed it)")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "detect.json"), "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
