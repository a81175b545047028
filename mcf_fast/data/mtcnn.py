"""MTCNN face detector (Zhang et al. 2016) on torch, with the weights that ship inside a registry package.

Why this one: it is a CNN (far better recall than the Haar/LBP cascades, see `benchmarks/bench_detect.py`),
its three small networks run on a CPU at a few images per second, and its weights travel inside the
`facenet-pytorch` wheel (`facenet_pytorch/data/{pnet,rnet,onet}.pt`, plain state dicts, 2 MB). That
package pins torch < 2.3, so it is installed with `pip install --no-deps facenet-pytorch==2.6.0` and
nothing of it is imported: only its three weight files are read, with `torch.load(weights_only=True)`,
into the networks defined here. `MTCNN(weights_dir=DIR)` reads the three files from any other folder.

The cascade: an image pyramid (factor 0.709, smallest face `min_face` px) through the fully
convolutional P-Net; candidates above 0.6 kept, NMS per scale (IoU 0.5) and over all scales (0.7);
each box made square, cut out and resized to 24 px for R-Net (score 0.7, NMS 0.7), then to 48 px for
O-Net (score 0.7, box regression, NMS 0.7 on the smaller box). Inputs are RGB scaled to
(x - 127.5) / 128. The dense layers were ported from a (W, H, C)-ordered framework, hence the permute
before flattening.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
INSTALL_HINT = ("pip install --no-deps facenet-pytorch==2.6.0 (only its weight files are read), or use "
                "--detector haar or lbp")


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def find_weights(weights_dir: str = "") -> str:
    """The folder holding pnet.pt / rnet.pt / onet.pt: `weights_dir`, else facenet-pytorch's data folder
    (located without importing that package). Raises FileNotFoundError with the install hint."""
    if not weights_dir:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the mtcnn detector needs its weights: {INSTALL_HINT}")
        weights_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [f for f in WEIGHT_FILES if not os.path.isfile(os.path.join(weights_dir, f))]
    if missing:
        raise FileNotFoundError(f"mtcnn weights {missing} not found in {weights_dir}: {INSTALL_HINT}")
    return weights_dir


def available(weights_dir: str = "") -> bool:
    try:
        find_weights(weights_dir)
        return True
    except FileNotFoundError:
        return False


def nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, mode: str = "union") -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression; `min` divides the overlap by the smaller box."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        denom = torch.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= thresh]
    return torch.tensor(keep, dtype=torch.long)


def _square(b: torch.Tensor) -> torch.Tensor:
    """Boxes grown to squares of side max(w, h) about their centres."""
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = torch.maximum(w, h)
    x1, y1 = b[:, 0] + w / 2 - side / 2, b[:, 1] + h / 2 - side / 2
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def _regress(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    return b + reg * torch.stack([w, h, w, h], 1)


def _patches(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box cut from img [3, H, W] (zero outside the image) and resized to size x size (area)."""
    H, W = img.shape[1:]
    out = []
    for x1, y1, x2, y2 in boxes.floor().long().tolist():
        bw, bh = max(1, x2 - x1 + 1), max(1, y2 - y1 + 1)
        canvas = img.new_zeros(3, bh, bw)
        sx, sy, ex, ey = max(0, x1), max(0, y1), min(W, x2 + 1), min(H, y2 + 1)
        if ex > sx and ey > sy:
            canvas[:, sy - y1:ey - y1, sx - x1:ex - x1] = img[:, sy:ey, sx:ex]
        out.append(F.interpolate(canvas[None], size=(size, size), mode="area")[0])
    return torch.stack(out)


class MTCNN:
    """`MTCNN(min_face)(rgb uint8 [H, W, 3]) -> [(x, y, w, h, score)]`, best score first."""

    def __init__(self, min_face: int = 20, weights_dir: str = "", thresholds=THRESHOLDS):
        folder = find_weights(weights_dir)
        self.nets = []
        for net, name in zip((PNet(), RNet(), ONet()), WEIGHT_FILES):
            state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)  # any other layout is an error naming the keys
            self.nets.append(net.eval())
        self.min_face, self.thresholds = max(12, int(min_face)), thresholds

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray, min_face: int | None = None) -> list:
        img = (torch.tensor(rgb).permute(2, 0, 1).float() - 127.5) * 0.0078125  # a copy: inputs may be read-only
        boxes = self._stage1(img, max(12, int(min_face or self.min_face)))
        for stage in (1, 2):
            if boxes.shape[0] == 0:
                return []
            boxes = self._refine(img, boxes, stage)
        return [(float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1]), float(b[4])) for b in boxes]

    def _stage1(self, img: torch.Tensor, min_face: int) -> torch.Tensor:
        H, W = img.shape[1:]
        m = 12.0 / min_face
        found = []
        scale, side = m, min(H, W) * m
        while side >= 12:
            h, w = int(math.ceil(H * scale)), int(math.ceil(W * scale))
            prob, reg = self.nets[0](F.interpolate(img[None], size=(h, w), mode="area"))
            ys, xs = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if ys.numel():
                score = prob[0, ys, xs]
                cell = torch.stack([xs, ys], 1).float()
                q1, q2 = torch.floor((2 * cell + 1) / scale), torch.floor((2 * cell + 12) / scale)
                b = torch.cat([q1, q2, score[:, None], reg[0, :, ys, xs].T], 1)
                found.append(b[nms(b[:, :4], b[:, 4], 0.5)])
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        if not found:
            return torch.zeros(0, 5)
        b = torch.cat(found)
        b = b[nms(b[:, :4], b[:, 4], 0.7)]
        return torch.cat([_square(_regress(b[:, :4], b[:, 5:9])), b[:, 4:5]], 1)

    def _refine(self, img: torch.Tensor, boxes: torch.Tensor, stage: int) -> torch.Tensor:
        size = 24 if stage == 1 else 48
        out = self.nets[stage](_patches(img, boxes[:, :4], size))
        score, reg = out[0], out[1]
        keep = score > self.thresholds[stage]
        b, score, reg = boxes[keep, :4], score[keep], reg[keep]
        if stage == 1:
            k = nms(b, score, 0.7)
            return torch.cat([_square(_regress(b[k], reg[k])), score[k, None]], 1)
        b = _regress(b, reg)
        k = nms(b, score, 0.7, mode="min")
        return torch.cat([b[k], score[k, None]], 1)
