"""One optimizer step of MCF training, as one object: the loop and the step benchmark both call it.

Per micro-batch: masks for two views from (seed, micro-step, sample ids), the EMA update of the target
(before its forward, as the reference does), the forward under autocast, the backward of loss / accum.
Then: the global grad norm (clipped if asked), a finiteness flag, fused AdamW told to skip on that flag
on the device, zero_grad. Nothing here reads a tensor back to the host: the results stay on the device
and the caller decides when to look (logging steps). The one exception is the foreach fallback for
devices without fused AdamW, which has no device-side skip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mcf_fast.masking import build_mask_generator
from mcf_fast.model.mcf import EMA_CADENCES, ema_update
from mcf_fast.model.terms import NamedTerms

from .config import Config
from .optim import set_lr
from .runtime import Runtime


@dataclass
class StepResult(NamedTerms):
    """Device tensors of one optimizer step (0-dim, float32 unless noted) and its last micro-batch."""
    loss: torch.Tensor  # mean over the micro-batches of the total loss (the weighted sum of the terms)
    terms: dict[str, torch.Tensor]  # mean over the micro-batches of each named term, unweighted
    weights: dict[str, float]  # each term's weight in `loss`
    grad_norm: torch.Tensor  # global norm before clipping
    bad: torch.Tensor  # 1.0 when the loss or the grad norm was not finite (the update was skipped), else 0.0
    images: torch.Tensor  # the last micro-batch's images, its prediction and its online mask (for pictures)
    pred: torch.Tensor
    mask: torch.Tensor


class TrainStep:
    """`step(batches, index, lr, momentum)`: one optimizer step over `cfg.optim.accum_steps` micro-batches
    pulled from the iterator `batches` (objects with `.images` and `.sample_ids`).

    `index` is the 0-based optimizer step: micro-batch j of it draws its masks for micro-step
    `index * accum_steps + j`, so masks depend on the run's position, never on a restart.
    `mark(name)`, if given, is called at phase boundaries ('data', 'ema', 'forward', 'backward',
    'optimizer'; the first four once per micro-batch) for the benchmark's phase timer.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: Config, rt: Runtime,
                 scaler: torch.amp.GradScaler | None = None):
        o = cfg.optim
        ema = o.ema_update
        if ema not in EMA_CADENCES:
            raise ValueError(f"optim.ema_update={ema!r}: must be 'micro' (before every micro-step's forward, "
                             "the reference) or 'step' (once per optimizer step)")
        self.model, self.optimizer, self.rt, self.scaler = model, optimizer, rt, scaler
        self.accum, self.clip, self.ema_every_micro = o.accum_steps, o.clip_grad, ema == "micro"
        self.mask_ratio, self.seed = cfg.model.mask_ratio, cfg.run.seed
        self.local_negatives = cfg.dist.negatives == "local"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema_target, self.ema_online = model.ema_pairs()
        self.num_patches = model.encoder.num_patches
        self.fused = bool(optimizer.defaults.get("fused"))
        self.masks = build_mask_generator(cfg.model, seed=cfg.run.seed, device=rt.device)  # kind, backend: once
        self._zero = torch.zeros((), device=rt.device)

    def __call__(self, batches: Iterator, index: int, lr: float, momentum: float,
                 mark: Callable[[str], None] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        loss, terms = self._zero.clone(), {}
        for micro in range(self.accum):
            imgs, masks, res = self._micro(batches, index * self.accum + micro, momentum,
                                           self.ema_every_micro or micro == 0, mark)
            loss += res.loss.detach().float() / self.accum
            for name, v in res.terms.items():
                if name not in terms:
                    terms[name] = self._zero.clone()
                terms[name] += v.detach().float() / self.accum
        gnorm, bad = self._update(loss)
        if mark:
            mark("optimizer")
        return StepResult(loss, terms, dict(res.weights), gnorm, bad, imgs, res.pred.detach(), masks.mask[0])

    def _micro(self, batches, micro_step: int, momentum: float, update_ema: bool, mark):
        """Masks, EMA, forward, backward of one micro-batch: (images, masks, model output)."""
        batch = next(batches)
        imgs = batch.images
        masks = self.masks(imgs.shape[0], step=micro_step, sample_ids=batch.sample_ids, views=2)
        if mark:
            mark("data")
        if update_ema:  # before k, every forward (the reference), or once per optimizer step
            ema_update(self.ema_target, self.ema_online, momentum)
        if mark:
            mark("ema")
        with self.rt.autocast():
            res = self.model(imgs, masks.ids_keep[0], masks.ids_restore[0], masks.mask[0], masks.ids_keep[1],
                             rank=self.rt.rank, local_negatives=self.local_negatives)
        loss = res.loss.float() / self.accum
        if mark:
            mark("forward")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if mark:
            mark("backward")
        return imgs, masks, res

    def _update(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grad norm, finiteness flag, the optimizer step (skipped on the device when not finite), zero_grad."""
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
        bad = (~torch.isfinite(loss) | ~torch.isfinite(gnorm)).float()
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        elif self.fused:
            opt.found_inf = bad  # fused AdamW skips the update on the device: no host sync
            opt.grad_scale = None
            opt.step()
        elif not bool(bad):  # foreach fallback has no device-side skip
            opt.step()
        opt.zero_grad(set_to_none=True)
        return gnorm, bad


__all__ = ["TrainStep", "StepResult", "EMA_CADENCES"]
