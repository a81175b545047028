"""Writers of synthetic faces in three on-disk formats (the readers in `mcf_fast.eval` read two of them).

All coordinates follow `faces`' conventions: pixels, integer values at pixel centres, 0-based,
"left" = image-left, 19 points in AFLW-19 order, parsing classes in LaPa order.

`wds` (pre-training shards): `OUT/faces-NNNNNN.tar` written by webdataset's ShardWriter, each sample
`KEY.jpg` (RGB JPEG at the face's quality) and `KEY.json` ({"seed", "index", "landmarks" [19][2],
"bbox" [left, right, top, bottom], "visible" [19]}); KEY = `{seed:04d}_{index:08d}`. Every shard gets
its DALI index `faces-NNNNNN.tar.idx` and an entry in `OUT/manifest.json`, so the shards are
validated (usable by the DALI loader) from the start.

`aflw19`: `OUT/AFLWinfo_release.mat` (scipy.io.savemat, MATLAB v5) with
  bbox      N x 4 float64  (left, right, top, bottom)
  data      N x 38 float64 (x1..x19, y1..y19)
  mask_new  N x 19 float64 (1 = visible; all ones here)
  nameList  N x 1 cell of relative paths "synth/NNNNNN.jpg" (files under OUT/data/flickr/)
  ra        1 x N float64, a 1-based random permutation of 1..N (seeded)
The real set has 24,386 faces and trains on the first 20,000 of `ra`. A synthetic set of N faces
trains on the first `train_count = round(N * train_fraction)` of `ra` and tests on the rest; that
count is stored in `OUT/split.json` as {"train_count": K, "num_faces": N, "rule": ...}, which
`mcf_fast.eval.datasets.aflw_train_count` reads.

`lapa`: `OUT/{train,val,test}/images/NNNNNN.jpg`, `labels/NNNNNN.png` (8-bit, one class index 0..10
per pixel) and `landmarks/NNNNNN.txt` ("106" on the first line, then 106 lines "x y"). LaPa has 106
points; ours are: 0-18 the AFLW-19 points (same order), 18 is the chin; 19-105 = 87 points on the
face outline (the drawn skin ellipse), evenly spaced in the ellipse's angle, starting at the chin and
going through the image-left side, except LaPa's indices 104, 105, 54, 84, 90, which hold the eye
centres, nose tip and mouth corners (AFLW points 7, 10, 13, 15, 17) because FaRL aligns LaPa faces
with exactly those five (farl/datasets/prepare.py, `FARL_ALIGN`). Faces 0..T-1 go to train
(T = round(N * train_fraction)), the rest split in half: val first, then test (each at least 1 face
when N >= 3). OUT/split.json records it.
"""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
from PIL import Image

from .faces import FACE_HALF_H, draw_face, face_params
from .index import index_written_shard, update_manifest

LAPA_POINTS = 106


def _quiet() -> None:
    """The default `tick` of the writers: called once per face written (the CLI's progress bar)."""
FARL_ALIGN = {104: 7, 105: 10, 54: 13, 84: 15, 90: 17}  # LaPa index -> AFLW-19 index (see the docstring)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def face_outline(seed: int, index: int, size: int, n: int) -> np.ndarray:
    """[n, 2] points on face `index`'s skin ellipse (see the module docstring for the order)."""
    p = face_params(seed, index)
    S = size
    cx, cy = S / 2 + p["shift"][0] * S, S / 2 + p["shift"][1] * S
    sx, sy = p["scale"] * S * (1.0 - 0.6 * abs(p["yaw"])), p["scale"] * S
    a = math.pi / 2 + np.arange(n) * (2 * math.pi / n)  # starts at the chin (+y), goes to image-left
    x, y = np.cos(a) * sx, np.sin(a) * FACE_HALF_H * sy
    c, s = math.cos(p["roll"]), math.sin(p["roll"])
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def write_wds(out: str, num: int, size: int, seed: int, shard_size: int = 1000, tick=_quiet) -> str:
    import webdataset as wds
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(out, "faces-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(num):
            f = draw_face(seed, i, size)
            meta = {"seed": seed, "index": i, "landmarks": f.landmarks.round(3).tolist(),
                    "bbox": f.bbox.round(3).tolist(), "visible": f.visible.tolist()}
            sink.write({"__key__": f"{seed:04d}_{i:08d}", "jpg": encode_jpeg(f.image, f.quality),
                        "json": json.dumps(meta).encode()})
            tick()
    shards = sorted(n for n in os.listdir(out) if n.startswith("faces-") and n.endswith(".tar"))
    entries = {n: index_written_shard(os.path.join(out, n), "synthetic") for n in shards}
    update_manifest(out, entries)
    return f"wrote {num} faces in {len(shards)} shard(s) to {out} (indexed, manifest.json)"


def write_aflw19(out: str, num: int, size: int, seed: int, train_fraction: float = 0.8, tick=_quiet) -> str:
    import scipy.io
    img_dir = os.path.join(out, "data", "flickr", "synth")
    os.makedirs(img_dir, exist_ok=True)
    bbox, data, names = np.zeros((num, 4)), np.zeros((num, 38)), np.empty((num, 1), dtype=object)
    for i in range(num):
        f = draw_face(seed, i, size)
        with open(os.path.join(img_dir, f"{i:06d}.jpg"), "wb") as fh:
            fh.write(encode_jpeg(f.image, f.quality))
        bbox[i] = f.bbox
        data[i, :19], data[i, 19:] = f.landmarks[:, 0], f.landmarks[:, 1]
        names[i, 0] = f"synth/{i:06d}.jpg"
        tick()
    ra = np.random.default_rng([seed, 0xA1F1]).permutation(num) + 1
    scipy.io.savemat(os.path.join(out, "AFLWinfo_release.mat"), {
        "bbox": bbox, "data": data, "mask_new": np.ones((num, 19)), "nameList": names,
        "ra": ra.reshape(1, -1).astype(np.float64)})
    k = min(max(1, round(num * train_fraction)), num - 1) if num > 1 else 1
    with open(os.path.join(out, "split.json"), "w") as fh:
        json.dump({"train_count": k, "num_faces": num, "seed": seed,
                   "rule": "first train_count faces of ra train, the rest test"}, fh, indent=1)
    return f"wrote AFLW-19 layout: {num} faces ({k} train / {num - k} test) to {out}"


def lapa_split(num: int, train_fraction: float) -> list[str]:
    """Split name of each face index (see the module docstring)."""
    t = min(max(1, round(num * train_fraction)), max(1, num - 2)) if num >= 3 else num
    rest = num - t
    v = (rest + 1) // 2
    return ["train"] * t + ["val"] * v + ["test"] * (rest - v)


def write_lapa(out: str, num: int, size: int, seed: int, train_fraction: float = 0.8, tick=_quiet) -> str:
    splits = lapa_split(num, train_fraction)
    for sp in ("train", "val", "test"):
        for sub in ("images", "labels", "landmarks"):
            os.makedirs(os.path.join(out, sp, sub), exist_ok=True)
    for i, sp in enumerate(splits):
        f = draw_face(seed, i, size)
        d, stem = os.path.join(out, sp), f"{i:06d}"
        with open(os.path.join(d, "images", stem + ".jpg"), "wb") as fh:
            fh.write(encode_jpeg(f.image, f.quality))
        Image.fromarray(f.parsing, mode="L").save(os.path.join(d, "labels", stem + ".png"))
        pts = np.concatenate([f.landmarks, face_outline(seed, i, size, LAPA_POINTS - 19)])
        pts[list(FARL_ALIGN)] = f.landmarks[list(FARL_ALIGN.values())]
        with open(os.path.join(d, "landmarks", stem + ".txt"), "w") as fh:
            fh.write(f"{LAPA_POINTS}\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in pts))
        tick()
    counts = {sp: splits.count(sp) for sp in ("train", "val", "test")}
    with open(os.path.join(out, "split.json"), "w") as fh:
        json.dump({**counts, "num_faces": num, "seed": seed, "train_fraction": train_fraction}, fh, indent=1)
    return f"wrote LaPa layout: {counts} to {out}"
