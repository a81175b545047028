"""Dense heads on a plain ViT: four feature levels -> a light FPN -> heatmaps (alignment) or logits (parsing).

The ViT gives one stride-p grid at every depth; like ViTDet's simple pyramid, the four levels (evenly
spaced blocks, 3/6/9/12 of 12) are resampled to strides p/4, p/2, p and 2p, merged top-down as in FPN,
and fused at stride p/4 (UPerNet's last step). The output lives on a grid of S/(p/4) cells.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcf_fast.model.vit import VisionTransformer


def level_blocks(depth: int, levels: int = 4) -> list[int]:
    """0-based blocks whose outputs feed the head: evenly spaced, the last block always included."""
    if depth < 1:
        raise ValueError(f"encoder depth must be >= 1, got {depth}")
    return [max(0, round(depth * (i + 1) / levels) - 1) for i in range(levels)]


def _resampler(dim: int, out: int, factor: float) -> nn.Module:
    """Project a level to `out` channels, then change its stride by `factor` (4, 2, 1 or 0.5)."""
    # Project first: the transposed convolutions then run on `out` channels, not the ViT width.
    layers: list[nn.Module] = [nn.Conv2d(dim, out, 1)]
    while factor > 1:
        layers += [nn.GELU(), nn.ConvTranspose2d(out, out, 2, stride=2)]
        factor /= 2
    if factor < 1:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm instead of BatchNorm: statistics do not depend on the (small) batch, so a resumed or
    # differently batched run computes the same thing.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8 if cout % 8 == 0 else 1, cout),
                         nn.GELU())


class DenseHead(nn.Module):
    """Four [N, D, g, g] maps -> [N, out_channels, 4g, 4g]."""

    def __init__(self, dim: int, out_channels: int, width: int = 128, factors=(4, 2, 1, 0.5)):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim, eps=1e-6) for _ in factors])
        self.lateral = nn.ModuleList([_resampler(dim, width, f) for f in factors])
        self.smooth = nn.ModuleList([_conv_bn(width, width) for _ in factors])
        # 1x1 then 3x3: a 3x3 straight on the concatenation costs 4x more and dominated the step time
        # of small encoders (measured on a ViT-tiny at 64 px).
        self.fuse = nn.Sequential(nn.Conv2d(width * len(factors), width, 1), _conv_bn(width, width))
        self.pred = nn.Conv2d(width, out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [lat(n(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
               for f, n, lat in zip(feats, self.norms, self.lateral)]
        for i in range(len(lat) - 2, -1, -1):  # FPN top-down: coarse context added to finer levels
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        outs = [s(x) for s, x in zip(self.smooth, lat)]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.pred(self.fuse(torch.cat(outs, 1)))


class DenseModel(nn.Module):
    """ViT encoder + dense head; `forward(x)` -> [N, out, 4g, 4g] maps on a grid of stride p/4."""

    def __init__(self, encoder: VisionTransformer, out_channels: int, width: int = 128,
                 freeze_backbone: bool = False, head: nn.Module | None = None, blocks: list[int] | None = None):
        super().__init__()
        self.encoder = encoder
        self.blocks = blocks if blocks is not None else level_blocks(len(encoder.blocks))
        self.grid = encoder.patch_embed.grid_size
        self.freeze_backbone = freeze_backbone
        self.head = head if head is not None else DenseHead(encoder.embed_dim, out_channels, width)
        if freeze_backbone:
            encoder.requires_grad_(False)

    @property
    def stride(self) -> float:
        """Input pixels per output cell (a head may set its own, e.g. FaRL's stride-4 pyramid)."""
        return getattr(self.head, "out_stride", self.encoder.patch_embed.patch_size / 4)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        uniq = sorted(set(self.blocks))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            seqs = dict(zip(uniq, self.encoder.forward_intermediates(x, uniq)))
        n, g = x.shape[0], self.grid
        # drop CLS, tokens -> [N, D, g, g]
        return [seqs[b][:, 1:].transpose(1, 2).reshape(n, -1, g, g) for b in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def soft_argmax(heatmaps: torch.Tensor, stride: float) -> torch.Tensor:
    """[N, P, h, w] logits -> [N, P, 2] expected (x, y) in input pixels; cell j's centre is (j + 0.5) * stride."""
    n, p, h, w = heatmaps.shape
    prob = heatmaps.float().flatten(2).softmax(-1).view(n, p, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=torch.float32) + 0.5) * stride
    ys = (torch.arange(h, device=heatmaps.device, dtype=torch.float32) + 0.5) * stride
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)


def heatmap_nll(heatmaps: torch.Tensor, points: torch.Tensor, stride: float, sigma: float = 1.0) -> torch.Tensor:
    """Cross-entropy between softmax(heatmaps) and a Gaussian (sigma in cells) at each target point."""
    h, w = heatmaps.shape[-2:]
    xs = (torch.arange(w, device=points.device, dtype=torch.float32) + 0.5) * stride
    ys = (torch.arange(h, device=points.device, dtype=torch.float32) + 0.5) * stride
    s2 = 2 * (sigma * stride) ** 2
    gx = -((xs.view(1, 1, 1, w) - points[..., 0, None, None]) ** 2) / s2
    gy = -((ys.view(1, 1, h, 1) - points[..., 1, None, None]) ** 2) / s2
    target = (gx + gy).flatten(2).softmax(-1)
    return -(target * heatmaps.float().flatten(2).log_softmax(-1)).sum(-1).mean()


def dense_model(encoder: VisionTransformer, out_channels: int, *, protocol: str, head_width: int, head_init: str,
                freeze_backbone: bool, seed: int) -> DenseModel:
    """The encoder with the protocol's head: FaRL's FPN + UPerHead on blocks 3/5/7/11 of 12 (`farl`), else
    the light FPN. The head's initial weights depend on the seed alone, so a pre-trained encoder and its
    scratch baseline start from the same head."""
    from .uper import FarlHead, farl_level_blocks
    torch.manual_seed(seed)
    if protocol == "farl":
        head = FarlHead(encoder.embed_dim, encoder.patch_embed.patch_size, out_channels, head_width, init=head_init)
        return DenseModel(encoder, out_channels, freeze_backbone=freeze_backbone, head=head,
                          blocks=farl_level_blocks(len(encoder.blocks)))
    return DenseModel(encoder, out_channels, head_width, freeze_backbone)

