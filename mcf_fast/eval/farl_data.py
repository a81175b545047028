"""Datasets of FaRL's downstream protocol (geometry in `farl.py`) and its photometric augmentations.

alignment: AFLW-19 box -> the whole input (FaRL's UpdateCropAndResizeMatrix), no tanh warp; train
crops get FaRL's random similarity and colour augmentations (RandomOcclusion, NoiseFusion with p=0.5,
RandomGray, RandomGamma, RandomBlur: farl/experiments/face_alignment/augmenters/train.yaml).
parsing: LaPa aligned by its five landmarks to the template, tanh warp 0.8; labels warped with
nearest neighbour and background (0) outside the image (lapa/train.yaml: outlier_value 0); colour
augmentations RandomGray, RandomGamma, RandomBlur (lapa/train.yaml).
The photometric augmentations follow blueprint's `ml/augmenters/image.py` defaults: gray with p=0.1;
gamma one of {sqrt, identity, square}; box blur of side int(mean(H, W) * U(0, 0.01)) when > 1; an
occlusion rectangle of height U(0.2, 0.8) x H/2 and width that +- 0.2, set to black; noise fusion
(1 - a) x + a U(0, 1) with a ~ U(0, 0.5).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import FaceRecord, ParsingRecord, read_lapa_landmarks
from .farl import AFLW_WARP_FACTOR, aflw_box_matrix, farl_jitter, input_grid, lapa_align_matrix, to_input, warp_to_input
from .transforms import load_label, load_rgb


def _rgb01(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(load_rgb(path), np.float32).copy()).permute(2, 0, 1) / 255.0


def _gray(x: torch.Tensor, rng) -> torch.Tensor:
    if rng.uniform() < 0.1:
        g = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])  # cv2's RGB2GRAY weights
        x = g.expand(3, -1, -1).clone()
    return x


def _gamma(x: torch.Tensor, rng) -> torch.Tensor:
    x = x.clamp(0, 1)
    k = rng.choice([-1, 0, 1])
    return x.sqrt() if k == -1 else (x * x if k == 1 else x)


def _blur(x: torch.Tensor, rng) -> torch.Tensor:
    k = int((x.shape[1] + x.shape[2]) / 2 * rng.uniform(0.0, 0.01))
    if k <= 1:
        return x
    # cv2.blur: a k x k box filter with reflected borders, the anchor at the kernel centre
    lo = k // 2
    pad = F.pad(x.clamp(0, 1)[None], (lo, k - 1 - lo, lo, k - 1 - lo), mode="reflect")
    return F.avg_pool2d(pad, k, stride=1)[0]


def _occlude(x: torch.Tensor, rng) -> torch.Tensor:
    _, h, w = x.shape
    rh = rng.uniform(0.2, 0.8)
    rw = rh - 0.2 + 0.4 * rng.uniform()
    cx, cy = int((h - 1) * rng.uniform()), int((w - 1) * rng.uniform())  # blueprint draws them this way round
    dh, dw = int(h / 2 * rh), int(w / 2 * rw)
    x0, y0 = max(0, cx - dw // 2), max(0, cy - dh // 2)
    x1, y1 = min(w - 1, cx + dw // 2), min(h - 1, cy + dh // 2)
    x = x.clone()
    x[:, y0:y1 + 1, x0:x1 + 1] = 0
    return x


def _noise(x: torch.Tensor, rng) -> torch.Tensor:
    if rng.uniform() >= 0.5:
        return x
    a = 0.5 * rng.uniform()
    noise = torch.from_numpy(rng.random(x.shape, dtype=np.float32))
    return (1 - a) * x + a * noise


def photometric(x: torch.Tensor, rng, task: str) -> torch.Tensor:
    """FaRL's colour augmentations of one [3, S, S] image in [0, 1], in its order."""
    if task == "alignment":
        x = _noise(_occlude(x, rng), rng)
    return _blur(_gamma(_gray(x, rng), rng), rng).clamp(0, 1)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class _FarlBase(torch.utils.data.Dataset):
    task = ""

    def __init__(self, records, size: int, mean, std, augment: bool, seed: int, warp_factor: float,
                 shift: float = 0.0):
        self.records, self.size, self.mean, self.std = records, size, mean, std
        self.augment, self.seed, self.warp_factor = augment, seed, warp_factor
        self.shift = shift  # the tanh warp's frame (farl.frame_shift)

    def __len__(self):
        return len(self.records)

    def _rng(self, key):
        """(index, rng or None): augmentation keyed by (seed, stream position), so a resume redraws it."""
        i, pos = (int(key), -1) if np.ndim(key) == 0 else (int(key[0]), int(key[1]))
        rng = np.random.default_rng([self.seed, 2, pos]) if self.augment and pos >= 0 else None
        return i, rng

    def _matrix(self, base: np.ndarray, rng) -> np.ndarray:
        return base if rng is None else farl_jitter(rng, self.size, self.task) @ base

    def _image(self, path: str, m: np.ndarray, rng, grid=None) -> torch.Tensor:
        x = warp_to_input(_rgb01(path), m, self.size, self.warp_factor, grid=grid, shift=self.shift).clamp(0, 1)
        if rng is not None:
            x = photometric(x, rng, self.task)
        return _normalise(x, self.mean, self.std)


class FarlAlignmentData(_FarlBase):
    """AFLW-19 as FaRL feeds it; items: image [3,S,S], points [19,2] (input pixels), matrix, index."""
    task = "alignment"

    def __init__(self, records: list[FaceRecord], size: int, mean, std, augment: bool = False, seed: int = 0,
                 warp_factor: float = AFLW_WARP_FACTOR, shift: float = 0.0):
        super().__init__(records, size, mean, std, augment, seed, warp_factor, shift)

    def __getitem__(self, key):
        i, rng = self._rng(key)
        r = self.records[i]
        m = self._matrix(aflw_box_matrix(r.box, self.size), rng)
        pts = to_input(r.landmarks, m, self.size, self.warp_factor, self.shift)
        return {"image": self._image(r.image, m, rng), "points": torch.from_numpy(pts).float(),
                "matrix": torch.from_numpy(m), "index": i}


def lapa_matrix(record: ParsingRecord, size: int) -> np.ndarray:
    """The record's alignment matrix (dataset points -> input pixels) from its 106-point file."""
    if not record.landmarks:
        raise FileNotFoundError(f"FaRL's LaPa protocol aligns faces with the 106 landmarks, but {record.image} "
                                "has no landmarks/<stem>.txt; add them or use --protocol resize-whole")
    return lapa_align_matrix(read_lapa_landmarks(record.landmarks), size)


class FarlParsingData(_FarlBase):
    """LaPa as FaRL feeds it; items: image, label [S,S] (train only), matrix, original size, index."""
    task = "parsing"

    def __init__(self, records: list[ParsingRecord], size: int, mean, std, augment: bool = False,
                 seed: int = 0, warp_factor: float = 0.8, with_label: bool = True, shift: float = 0.0):
        super().__init__(records, size, mean, std, augment, seed, warp_factor, shift)
        self.with_label = with_label

    def __getitem__(self, key):
        i, rng = self._rng(key)
        r = self.records[i]
        m = self._matrix(lapa_matrix(r, self.size), rng)
        grid = input_grid(m, self.size, self.warp_factor, self.shift)  # shared by the image and its label
        out = {"image": self._image(r.image, m, rng, grid), "matrix": torch.from_numpy(m), "index": i}
        if self.with_label:
            lab = torch.from_numpy(np.asarray(load_label(r.label), np.float32).copy())[None]
            warped = warp_to_input(lab, m, self.size, self.warp_factor, mode="nearest", fill=0.0, grid=grid)
            out["label"] = warped[0].round().long()
        return out
