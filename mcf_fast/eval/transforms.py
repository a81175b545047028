"""Geometry and torch datasets for the downstream tasks.

Warps use continuous coordinates with pixel i covering [i, i + 1) (PIL's `Image.transform`). Landmark
files put integer values at pixel centres (cv2's convention, and the synthetic generator's), so
points enter the continuous frame shifted by +0.5 (`CENTRE`). One matrix per sample then maps
dataset points to network-input pixels, and its inverse maps predictions back exactly for scoring.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .datasets import FaceRecord, ParsingRecord

IGNORE = 255  # label value for pixels warped in from outside the image
CENTRE = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])  # dataset points -> continuous pixel frame


def box_crop_matrix(box: np.ndarray, size: int, scale: float) -> np.ndarray:
    """Square crop centred on the box (left, right, top, bottom), side = scale * max(w, h) -> size."""
    l, r, t, b = (float(v) for v in box)
    side = scale * max(r - l, b - t)
    s = size / side
    return np.array([[s, 0, size / 2 - s * (l + r) / 2], [0, s, size / 2 - s * (t + b) / 2], [0, 0, 1]])


def resize_matrix(width: int, height: int, size: int) -> np.ndarray:
    """The whole image squeezed to size x size."""
    return np.diag([size / width, size / height, 1.0])


def jitter_matrix(rng: np.random.Generator, size: int, scale: float, shift: float, rot_deg: float) -> np.ndarray:
    """A random similarity about the crop centre: zoom in [1-scale, 1+scale], shift up to shift*size, rotation."""
    z = 1.0 + rng.uniform(-scale, scale)
    a = math.radians(rng.uniform(-rot_deg, rot_deg))
    dx, dy = rng.uniform(-shift, shift, size=2) * size
    c, s = z * math.cos(a), z * math.sin(a)
    h = size / 2
    return np.array([[c, -s, h - c * h + s * h + dx], [s, c, h - s * h - c * h + dy], [0, 0, 1]])


def warp(img: Image.Image, m: np.ndarray, size: int, resample, fill=0) -> Image.Image:
    """The size x size image whose pixel at p is img at inv(m) p."""
    inv = np.linalg.inv(m)
    return img.transform((size, size), Image.AFFINE, data=tuple(inv[:2].reshape(-1)), resample=resample,
                         fillcolor=fill)


def apply_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """[..., 2] points through the affine 3x3 m."""
    return pts @ m[:2, :2].T + m[:2, 2]


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


class _Base(torch.utils.data.Dataset):
    def __init__(self, records, size: int, mean, std, augment: bool, seed: int, jitter=(0.1, 0.05, 10.0)):
        self.records, self.size, self.mean, self.std = records, size, mean, std
        self.augment, self.seed, self.jitter = augment, seed, jitter

    def __len__(self):
        return len(self.records)

    def _jitter(self, pos: int) -> np.ndarray:
        """Augmentation keyed by (seed, position in the sample stream): a resumed run redraws it exactly."""
        if not self.augment or pos < 0:
            return np.eye(3)
        return jitter_matrix(np.random.default_rng([self.seed, pos]), self.size, *self.jitter)

    @staticmethod
    def _key(key):
        return (int(key), -1) if np.ndim(key) == 0 else (int(key[0]), int(key[1]))


class AlignmentData(_Base):
    """Box crops of AFLW-19 faces; items: image [3,S,S], points [19,2] in input pixels, matrix [3,3]
(dataset points -> input pixels), index."""

    def __init__(self, records: list[FaceRecord], size: int, mean, std, crop_scale: float = 1.2,
                 augment: bool = False, seed: int = 0):
        super().__init__(records, size, mean, std, augment, seed)
        self.crop_scale = crop_scale

    def __getitem__(self, key):
        i, pos = self._key(key)
        r = self.records[i]
        m = self._jitter(pos) @ box_crop_matrix(r.box, self.size, self.crop_scale)
        img = warp(load_rgb(r.image), m, self.size, Image.BILINEAR)
        m = m @ CENTRE  # from here on: dataset points -> input pixels
        pts = apply_points(m, r.landmarks)
        return {"image": to_tensor(img, self.mean, self.std), "points": torch.from_numpy(pts).float(),
                "matrix": torch.from_numpy(m), "index": i}


class ParsingData(_Base):
    """LaPa images squeezed to S x S; items: image, label [S,S] (train only), original size, index."""

    def __init__(self, records: list[ParsingRecord], size: int, mean, std, augment: bool = False,
                 seed: int = 0, with_label: bool = True):
        super().__init__(records, size, mean, std, augment, seed)
        self.with_label = with_label

    def __getitem__(self, key):
        i, pos = self._key(key)
        r = self.records[i]
        img = load_rgb(r.image)
        m = self._jitter(pos) @ resize_matrix(img.width, img.height, self.size)
        out = {"image": to_tensor(warp(img, m, self.size, Image.BILINEAR), self.mean, self.std),
               "orig_size": torch.tensor([img.height, img.width]), "index": i}
        if self.with_label:
            lab = load_label(r.label, (img.height, img.width))
            out["label"] = torch.from_numpy(np.asarray(warp(lab, m, self.size, Image.NEAREST, IGNORE),
                                                       np.int64).copy())
        return out


def load_label(path: str, hw: tuple[int, int] | None = None) -> Image.Image:
    """A label map as a one-channel image of class indices; its size must match the image's."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map {path} has mode {im.mode}; expected one channel of class indices")
        lab = Image.fromarray(np.asarray(im).astype(np.uint8)) if im.mode != "L" else im.copy()
    if hw is not None and (lab.height, lab.width) != tuple(hw):
        raise ValueError(f"label map {path} is {lab.width}x{lab.height} but its image is {hw[1]}x{hw[0]}")
    return lab


class StepBatches(torch.utils.data.Sampler):
    """Batches of (index, stream position) for steps start..total-1: epoch e is a permutation drawn from
    (seed, e), step t takes stream positions [t*B, (t+1)*B); so step t's batch is the same after a resume."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int):
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self):
        return max(0, self.total - self.start)

    def _at(self, pos: int) -> int:
        e = pos // self.n
        if e not in self._perms:
            self._perms = {e: np.random.default_rng([self.seed, 1, e]).permutation(self.n)}
        return int(self._perms[e][pos % self.n])

    def __iter__(self):
        for t in range(self.start, self.total):
            yield [(self._at(p), p) for p in range(t * self.bs, (t + 1) * self.bs)]
