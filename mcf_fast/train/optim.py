"""AdamW with MAE's parameter groups, per-iteration schedules (cosine LR with warm-up, EMA momentum)."""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_tokens: bool = False) -> list[dict]:
    """Decay only weight matrices: no decay on biases, norms, tokens or position tables (ndim < 2
    or a token-like name). decay_tokens=True is the reference code's rule (timm 0.3.2's
    `add_weight_decay`): no decay only for 1-D tensors and biases, so cls_token and mask_token decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay_tokens:
            exempt = p.ndim <= 1 or name.endswith(".bias")
        else:
            exempt = p.ndim < 2 or name.endswith(("cls_token", "mask_token", "pos_embed")) or ".norm" in name
        if exempt:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device, decay_tokens: bool = False) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all tensors; it can skip a step on `found_inf` without a host sync),
    foreach where fused is unavailable."""
    groups = param_groups(model, weight_decay, decay_tokens)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError) as e:  # e.g. a device without fused support
        log.info("fused AdamW unavailable on %s (%s): using foreach", device, e)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step: int, total: int, warmup: int, base: float, minimum: float, from_zero: bool = False) -> float:
    """Linear warm-up to `base` over `warmup` steps, then half-cosine to `minimum` at `total`.
    from_zero=True is MAE's `adjust_learning_rate` on the epoch fraction (the reference's): step s of the
    warm-up gets base * s / warmup, so the first step uses lr = 0; otherwise base * (s + 1) / warmup."""
    if warmup > 0 and step < warmup:
        return base * (step if from_zero else step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def ema_momentum(step: int, total: int, base: float, schedule: str) -> float:
    """Constant m, or MoCo v3's cosine from m to 1 over training."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
