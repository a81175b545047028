"""MoCo v3 projector / predictor, with BatchNorm synchronised over ranks as MoCo v3 does.

`nn.SyncBatchNorm` only runs on CUDA; `SyncBatchNorm1d` here all-reduces the batch moments with an
autograd-aware all_reduce, so it trains the same on gloo (CPU) and NCCL, and is plain BatchNorm1d
when no process group is initialised.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mcf_fast.registry import choices


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (each rank's loss depends on
    every rank's statistics). torch.distributed.nn's version of this is deprecated."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are taken over the global batch (all ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _dist_on()):
            return super().forward(x)
        xf = x.float()
        n_local = torch.tensor([float(x.shape[0])], device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n_local])
        stats = _AllReduceSum.apply(stats)  # differentiable: gradients flow to every rank's inputs
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: Linear(no bias)-BN-ReLU repeated, last Linear, optional BN(affine=False)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [SyncBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(SyncBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def projector(dim: int, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    """Linear(D, 4096, no bias) - BN - ReLU - Linear(4096, 256, no bias) - BN(affine=False)."""
    return mlp(2, dim, hidden, out, last_bn=True)


def predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    """Linear(256, 4096) - BN - ReLU - Linear(4096, 256); no final BN. No biases (as MoCo v3)."""
    return mlp(2, dim, hidden, dim, last_bn=False)


HEAD_INITS = choices("projector/predictor init", "--model.head_init", {
    "torch": "PyTorch's default Linear init",
    "xavier": "xavier_uniform weights, zero biases: the reference code"})


def init_heads_(module: nn.Module, mode: str) -> None:
    """'torch': keep PyTorch's default Linear init; 'xavier': xavier_uniform on every Linear weight, as the
    reference code does (its model-wide weight init runs after the projector/predictor are built)."""
    HEAD_INITS.get(mode)
    if mode == "xavier":
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0 (no gradient; k needs none)."""
    if not _dist_on():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim)
