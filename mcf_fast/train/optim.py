"""AdamW with MAE's parameter groups, per-iteration schedules (cosine LR with warm-up, EMA momentum)."""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices: no decay on biases, norms, tokens or position tables (ndim < 2
    or a token-like name)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("cls_token", "mask_token", "pos_embed")) or ".norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all tensors; it can skip a step on `found_inf` without a host sync),
    foreach where fused is unavailable."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError) as e:  # e.g. a device without fused support
        log.info("fused AdamW unavailable on %s (%s): using foreach", device, e)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then half-cosine to `minimum` at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
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
