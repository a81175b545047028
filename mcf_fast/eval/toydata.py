"""Tiny AFLW-19 / LaPa folders in the real on-disk layouts, for tests (not the project's synthetic faces).

Each face is a skin-coloured ellipse with drawn brows, eyes, nose and mouth at template positions
moved by a random similarity, so landmarks and parts are learnable from a few dozen images.
`mcf_fast.data.synthetic` is the project's generator; this one exists so the eval tests do not
depend on it.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

# 19 AFLW-style points on a unit face (x right, y down, face centre at 0): brows 0-5, eyes 6-11
# (outer corner, centre, inner corner / inner, centre, outer), nose 12-14, mouth 15-17, chin 18.
TEMPLATE = np.array([
    [-0.55, -0.45], [-0.35, -0.52], [-0.15, -0.45], [0.15, -0.45], [0.35, -0.52], [0.55, -0.45],
    [-0.5, -0.25], [-0.35, -0.25], [-0.2, -0.25], [0.2, -0.25], [0.35, -0.25], [0.5, -0.25],
    [-0.15, 0.12], [0.0, 0.18], [0.15, 0.12], [-0.28, 0.45], [0.0, 0.42], [0.28, 0.45], [0.0, 0.92]])
# (class, centre, half-axes) on the unit face; drawn in this order, later parts over earlier ones.
PARTS = [(2, (-0.35, -0.49), (0.22, 0.06)), (3, (0.35, -0.49), (0.22, 0.06)),
         (4, (-0.35, -0.25), (0.16, 0.08)), (5, (0.35, -0.25), (0.16, 0.08)),
         (6, (0.0, 0.08), (0.1, 0.16)), (7, (0.0, 0.38), (0.3, 0.05)),
         (8, (0.0, 0.45), (0.26, 0.03)), (9, (0.0, 0.51), (0.3, 0.05))]
COLOURS = {0: (40, 60, 90), 1: (225, 180, 150), 2: (60, 40, 20), 3: (60, 40, 20), 4: (250, 250, 250),
           5: (250, 250, 250), 6: (200, 140, 120), 7: (180, 40, 60), 8: (60, 0, 10), 9: (170, 30, 50),
           10: (90, 60, 30)}


def _face(rng, size: int):
    """A random similarity: centre, scale (face half-width in pixels), rotation."""
    r = size * rng.uniform(0.22, 0.3)
    c = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    a = rng.uniform(-0.25, 0.25)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return lambda p: (np.asarray(p, float) @ rot.T) * r + c, r


def _ellipse(draw, tf, centre, axes, fill, n=24):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = tf(np.stack([centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)], 1))
    draw.polygon([tuple(p) for p in pts], fill=fill)


def draw_face(rng, size: int):
    """(RGB image, label map, 19 points [19, 2], box (l, r, t, b))."""
    tf, r = _face(rng, size)
    bg = tuple(int(v) for v in rng.integers(0, 120, 3))
    img = Image.new("RGB", (size, size), bg)
    lab = Image.new("L", (size, size), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for cls, centre, axes in [(10, (0.0, -0.35), (0.95, 0.75)), (1, (0.0, 0.05), (0.8, 1.0))] + PARTS:
        _ellipse(di, tf, centre, axes, COLOURS[cls])
        _ellipse(dl, tf, centre, axes, cls)
    arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (size, size, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    pts = tf(TEMPLATE)
    lo, hi = pts.min(0), pts.max(0)
    pad = 0.1 * r
    return img, lab, pts, np.array([lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad])


def write_aflw19(out: str, num: int, size: int = 64, seed: int = 0, train_count: int | None = None) -> str:
    """`out/AFLWinfo_release.mat` + `out/data/flickr/<k>/imageNNNNN.jpg`; split.json when train_count given."""
    import scipy.io
    rng = np.random.default_rng(seed)
    names, boxes, data = [], [], []
    for i in range(num):
        img, _, pts, box = draw_face(rng, size)
        name = f"{i % 3}/image{i:05d}.jpg"
        os.makedirs(os.path.join(out, "data", "flickr", str(i % 3)), exist_ok=True)
        img.save(os.path.join(out, "data", "flickr", name), quality=95)
        names.append(name)
        boxes.append(box)
        data.append(np.concatenate([pts[:, 0], pts[:, 1]]))
    mask = np.ones((num, 19))
    mask[::4, 0] = 0  # every fourth face has an occluded point, so the frontal subset is a real subset
    cell = np.empty((num, 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    ra = (rng.permutation(num) + 1).astype(np.float64)[None]
    scipy.io.savemat(os.path.join(out, "AFLWinfo_release.mat"),
                     {"bbox": np.array(boxes), "data": np.array(data), "mask_new": mask, "nameList": cell, "ra": ra})
    if train_count is not None:
        with open(os.path.join(out, "split.json"), "w") as f:
            f.write(f'{{"train_count": {int(train_count)}}}\n')
    return out


# FaRL aligns LaPa with landmarks[[104, 105, 54, 84, 90]] (farl/datasets/prepare.py): the two eye centres,
# the nose tip and the mouth corners; here they are the toy face's points 7, 10, 13, 15 and 17.
LAPA_FROM_TOY = {104: 7, 105: 10, 54: 13, 84: 15, 90: 17}


def lapa_points(pts: np.ndarray) -> np.ndarray:
    """[106, 2] LaPa-style landmarks: FaRL's five alignment points at LaPa's indices, the chin elsewhere."""
    lm = np.repeat(pts[-1:], 106, 0)
    lm[:len(pts)] = pts
    for lapa, toy in LAPA_FROM_TOY.items():
        lm[lapa] = pts[toy]
    return lm


def write_lapa(out: str, num: dict | int, size: int = 64, seed: int = 0) -> str:
    """`out/{train,val,test}/{images,labels,landmarks}` with `num` images per split (or a dict per split)."""
    rng = np.random.default_rng(seed)
    counts = num if isinstance(num, dict) else {"train": num, "val": max(1, num // 4), "test": max(1, num // 2)}
    k = 0
    for split, n in counts.items():
        for sub in ("images", "labels", "landmarks"):
            os.makedirs(os.path.join(out, split, sub), exist_ok=True)
        for _ in range(n):
            img, lab, pts, _ = draw_face(rng, size)
            stem = f"{k:06d}"
            img.save(os.path.join(out, split, "images", stem + ".jpg"), quality=95)
            lab.save(os.path.join(out, split, "labels", stem + ".png"))
            lm = lapa_points(pts)
            with open(os.path.join(out, split, "landmarks", stem + ".txt"), "w") as f:
                f.write("106\n" + "\n".join(f"{x:.2f} {y:.2f}" for x, y in lm) + "\n")
            k += 1
    return out
