"""FaRL's dense head on our ViT: four block outputs -> FaRL's FPN resamplers -> mmseg's UPerHead.

Follows farl/network/transformers.py (FaRLVisualFeatures: output_indices [3, 5, 7, 11] of 12 blocks for
ViT-B, [7, 11, 15, 23] of 24 for ViT-L; `_make_fpns`: patch 16/14 -> ConvT2 + BN + GELU + ConvT2, ConvT2,
identity, MaxPool2; patch 8 -> ConvT2, identity, MaxPool2, MaxPool4) and farl/network/mmseg.py (UPerHead,
pool_scales (1, 2, 3, 6), channels = head_channel 768, dropout 0.1, BN, align_corners False). The
alignment variant reads landmarks off sigmoid heatmaps (face_alignment/networks/farl.yaml:
heatmap_act sigmoid; farl/network/geometry.py heatmap2points: the heatmap-weighted mean of the cell
centres); its losses are in `farl_alignment_loss` (face_alignment/task.py, trainers/aflw19_farl.yaml).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def farl_level_blocks(depth: int) -> list[int]:
    """FaRL's output blocks scaled to our depth: 12 -> [3, 5, 7, 11], 24 -> [7, 11, 15, 23]."""
    if depth < 1:
        raise ValueError(f"encoder depth must be >= 1, got {depth}")
    return [max(0, round(depth * k / 12) - 1) for k in (4, 6, 8, 12)]


def farl_fpns(patch: int, dim: int) -> tuple[nn.ModuleList, float]:
    """FaRL's `_make_fpns` for our patch size, and the stride (input pixels) of the finest level."""
    if patch in (14, 16):
        fpns = [nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                              nn.ConvTranspose2d(dim, dim, 2, 2)),
                nn.ConvTranspose2d(dim, dim, 2, 2), nn.Identity(), nn.MaxPool2d(2, 2)]
        return nn.ModuleList(fpns), patch / 4
    if patch == 8:
        fpns = [nn.ConvTranspose2d(dim, dim, 2, 2), nn.Identity(), nn.MaxPool2d(2, 2), nn.MaxPool2d(4, 4)]
        return nn.ModuleList(fpns), patch / 2
    raise ValueError(f"FaRL's head is defined for patch sizes 8, 14 and 16 (farl/network/transformers.py); "
                     f"the encoder has patch {patch}: use --protocol resize-whole/square-crop")


HEAD_INITS = ("mmcv", "torch")


def mmcv_kaiming_(conv: nn.Conv2d) -> None:
    """mmcv's ConvModule.init_weights for a conv followed by ReLU: kaiming_init(conv, a=0, mode='fan_out',
    nonlinearity='relu', distribution='normal'), bias 0 (mmcv/cnn/bricks/conv_module.py, mmcv 1.3.14 as
    FaRL's README pins; it runs inside ConvModule.__init__, so FaRL's UPerHead starts from it)."""
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvBNReLU(nn.Sequential):
    """mmcv ConvModule with BN: conv without bias, BN (weight 1, bias 0), ReLU; `init` mmcv or torch."""

    def __init__(self, cin: int, cout: int, k: int, init: str = "mmcv"):
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
        if init == "mmcv":  # at construction, as ConvModule does: the RNG order follows the build order
            mmcv_kaiming_(self[0])


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """mmseg's UPerHead: PPM on the coarsest level, FPN top-down, 3x3 smoothing, fuse, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 levels: int = 4, dropout: float = 0.1, init: str = "mmcv"):
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList([ConvBNReLU(in_channels, channels, 1, init) for _ in pool_scales])
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3, init)
        self.lateral = nn.ModuleList([ConvBNReLU(in_channels, channels, 1, init) for _ in range(levels - 1)])
        self.fpn = nn.ModuleList([ConvBNReLU(channels, channels, 3, init) for _ in range(levels - 1)])
        self.fuse = ConvBNReLU(levels * channels, channels, 3, init)
        self.dropout = nn.Dropout2d(dropout)
        # mmseg's conv_seg is a plain Conv2d: FaRL never calls the head's init_weights (its normal(0.01)
        # init_cfg), so it keeps PyTorch's default, as do the FPN resamplers (farl/network/transformers.py).
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [_resize(conv(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                      for s, conv in zip(self.pool_scales, self.ppm)]
        return self.bottleneck(torch.cat(outs, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self._psp(feats[-1])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.cls(self.dropout(self.fuse(torch.cat(outs, 1))))


class FarlHead(nn.Module):
    """Four [N, D, g, g] ViT maps -> FaRL's FPN resamplers -> UPerHead -> [N, out, h, w] at `out_stride`."""

    def __init__(self, dim: int, patch: int, out_channels: int, channels: int = 768, init: str = "mmcv"):
        super().__init__()
        self.fpns, self.out_stride = farl_fpns(patch, dim)
        self.uper = UperHead(dim, channels, out_channels, init=init)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.uper([fpn(f) for fpn, f in zip(self.fpns, feats)])


def heatmap_points(heatmaps: torch.Tensor, stride: float) -> torch.Tensor:
    """[N, P, h, w] logits -> [N, P, 2] input pixels: FaRL's heatmap2points on sigmoid(heatmaps)."""
    hm = torch.sigmoid(heatmaps.float())
    h, w = hm.shape[-2:]
    xs = (torch.arange(w, device=hm.device, dtype=torch.float32) + 0.5) * stride
    ys = (torch.arange(h, device=hm.device, dtype=torch.float32) + 0.5) * stride
    total = hm.sum((2, 3)).clamp_min(1e-6)
    return torch.stack([(hm.sum(2) * xs).sum(-1) / total, (hm.sum(3) * ys).sum(-1) / total], -1)


def awing_heatmaps(points01: torch.Tensor, size: int, radius: float) -> torch.Tensor:
    """FaRL's points2heatmap target: exp(-16 r^2 / (2 R^2)) within r <= R cells of each point
    (p2i 'gaussian_awing' kernel, reduce max), points given in [0, 1] and placed at p * size - 0.5."""
    c = points01.float() * size - 0.5
    grid = torch.arange(size, device=points01.device, dtype=torch.float32)
    dx2 = (grid.view(1, 1, 1, size) - c[..., 0, None, None]) ** 2
    dy2 = (grid.view(1, 1, size, 1) - c[..., 1, None, None]) ** 2
    r2 = dx2 + dy2
    return torch.where(r2 <= radius * radius, torch.exp(-r2 * 16 / (2 * radius * radius)), torch.zeros_like(r2))


def farl_alignment_loss(heatmaps: torch.Tensor, points: torch.Tensor, size: int, stride: float,
                        heatmap_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """FaRL's alignment losses (face_alignment/task.py; aflw19_farl.yaml weights 1 and 1, heatmap 128, R 5).

    coord: mean over points of the Euclidean error of coordinates normalised by the input size;
    heatmap: BCE-with-logits between the logits resized to a 128-cell grid (for a 448 input; scaled
    with the input) and the rendered targets."""
    pred = heatmap_points(heatmaps, stride) / size
    gt = points / size
    coord = (pred - gt).norm(dim=-1).mean()
    logs = {"coord": coord}
    loss = coord
    if heatmap_weight > 0:
        hs = max(8, round(128 * size / 448))
        logits = _resize(heatmaps.float(), (hs, hs))
        target = awing_heatmaps(gt, hs, 5.0 * hs / 128)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        loss = loss + heatmap_weight * bce
        logs["heatmap_bce"] = bce
    return loss, logs


def farl_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_scale: float) -> list[dict]:
    """FaRL's optimiser settings (optimizers/refine_backbone.yaml): the ViT at lr x backbone_scale, FPNs
    and head at lr, one AdamW weight decay for every parameter."""
    enc, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (enc if name.startswith("encoder.") else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0, "lr": lr, "weight_decay": weight_decay}]
    if enc:
        groups.append({"params": enc, "lr_scale": backbone_scale, "lr": lr * backbone_scale,
                       "weight_decay": weight_decay})
    return groups
