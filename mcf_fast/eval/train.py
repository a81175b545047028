"""The fine-tuning loop: build, (resume,) train for --max-steps, score, write the run folder.

A run folder explains itself: config.json, metrics.jsonl (one line per logged step and a final line
with the scores), ckpt.pt (atomic; rerunning the same command resumes from it), metrics.json,
metrics.md and predictions.png.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch

from .config import EvalConfig
from .encoders import build_encoder, param_groups
from .heads import DenseModel
from .tasks import TASK_CLASSES
from .transforms import StepBatches
from .uper import FarlHead, farl_level_blocks, farl_param_groups
from .viz import alignment_sheet, parsing_sheet, summary_markdown

log = logging.getLogger(__name__)
CKPT = "ckpt.pt"
# FaRL's MultiStepLR: x0.1 at epoch 200 (optimizers/refine_backbone.yaml) of max_epoches 300 (LaPa) / 150 (AFLW,
# so never); as a fraction of the run.
FARL_LR_DROP = {"parsing": 200 / 300, "alignment": 200 / 150}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
    return dev


def lr_at(step: int, cfg: EvalConfig) -> float:
    """Linear warm-up, then cosine decay to 0 (MAE fine-tuning) or FaRL's x0.1 step, as a factor of --lr."""
    warm = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, cfg.max_steps // 20)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "step":
        return 0.1 if step >= FARL_LR_DROP[cfg.task] * cfg.max_steps else 1.0
    t = (step - warm) / max(1, cfg.max_steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


class Ema:
    """Exponential moving average of every float parameter and buffer (FaRL scores `main_ema`, decay 0.999:
    trainers/*_farl.yaml); integer buffers are copied.

    The decay at update t is min(decay, (1 + t) / (10 + t)) (TensorFlow's num_updates warm-up; ours, since
    blueprint's EMAConfig was not available to read): at FaRL's 75,000+ steps this is 0.999 after the
    first ~9,000, while a 1,000-step run is not scored on weights still 37% made of the initial ones."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)


def save_checkpoint(path: str, model, opt, step: int, cfg: EvalConfig, ema: Ema | None = None) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "fingerprint": cfg.fingerprint()}
    if ema is not None:
        state["ema"] = ema.state
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a checkpoint counts only once it is complete


def load_checkpoint(path: str, model, opt, cfg: EvalConfig, ema: Ema | None = None) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != cfg.fingerprint():
        old, new = state.get("fingerprint", {}), cfg.fingerprint()
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise ValueError(f"{path} was written by a different configuration {diff} (old, new); "
                         "use another --out or --no-resume to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path} holds no EMA weights; use another --out or --no-resume to start over")
        ema.state = state["ema"]
    return int(state["step"])


def build_model(cfg: EvalConfig, out_channels: int):
    enc, info = build_encoder(cfg.encoder, cfg.arch or None, cfg.img_size or None, cfg.seed)
    # The head's initial weights depend on the seed alone: the pre-trained and scratch runs of a
    # comparison start from the same head.
    torch.manual_seed(cfg.seed)
    if cfg.protocol == "farl":
        head = FarlHead(enc.embed_dim, enc.patch_embed.patch_size, out_channels, cfg.head_width)
        model = DenseModel(enc, out_channels, freeze_backbone=cfg.freeze_backbone, head=head,
                           blocks=farl_level_blocks(len(enc.blocks)))
    else:
        model = DenseModel(enc, out_channels, cfg.head_width, cfg.freeze_backbone)
    return model, info


def build_optimizer(model, cfg: EvalConfig) -> torch.optim.Optimizer:
    if cfg.protocol == "farl":
        groups = farl_param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale)
    else:
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        for g in groups:
            g["lr_scale"] *= cfg.backbone_lr_scale if g.get("layer", 0) <= len(model.encoder.blocks) else 1.0
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def _autocast_for(device: torch.device):
    def autocast():
        # bf16 on GPU (as pre-training); fp32 on CPU, where bf16 autocast is slower on most machines.
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    return autocast


def _step(cfg: EvalConfig, model, opt, ema, task, batch, device, step: int, autocast):
    """One optimiser step; returns (loss, logs, lr factor)."""
    scale = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"] * scale
    # Dropout draws from a per-step seed, so a resumed run repeats the uninterrupted one exactly.
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    with autocast():
        loss, logs = task.loss(model, batch, device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    if ema is not None:
        ema.update(model, step)
    return loss, logs, scale


def _train(cfg: EvalConfig, model, opt, ema, task, train_ds, device, start: int, end: int, autocast) -> None:
    """Steps start..end-1 with metrics lines, a progress bar and checkpoints."""
    model.train()
    sampler = StepBatches(len(train_ds), cfg.batch_size, cfg.seed, start, end)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.task, dynamic_ncols=True)
    t0 = time.time()
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as mlog:
        for step, batch in zip(range(start, end), loader):
            loss, logs, scale = _step(cfg, model, opt, ema, task, batch, device, step, autocast)
            last = step + 1 == end
            if (step + 1) % cfg.log_every == 0 or last:
                rec = {"step": step + 1, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in logs.items()},
                       "lr": cfg.lr * scale, "elapsed_s": round(time.time() - t0, 3)}
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"loss became {rec['loss']} at step {step + 1}; lower --lr "
                                             "or raise --warmup-steps")
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if last or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
                save_checkpoint(os.path.join(cfg.out, CKPT), model, opt, step + 1, cfg, ema)
    if bar is not None:
        bar.close()


def _write_results(cfg: EvalConfig, metrics: dict, viz, run_info: dict) -> dict:
    out = {"task": cfg.task, **metrics, "units": "fraction", "run": run_info}
    _atomic_json(os.path.join(cfg.out, "metrics.json"), out)
    with open(os.path.join(cfg.out, "metrics.md"), "w") as f:
        f.write(summary_markdown(cfg.task, metrics, run_info))
    (alignment_sheet if cfg.task == "alignment" else parsing_sheet)(viz, os.path.join(cfg.out, "predictions.png"))
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as mlog:
        mlog.write(json.dumps({"step": cfg.max_steps, "final": True,
                               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}) + "\n")
    return out


def run(cfg: EvalConfig) -> dict:
    """Train and score; returns the metrics (also written to OUT/metrics.json)."""
    cfg = cfg.validate().resolved()
    os.makedirs(cfg.out, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    task_cls = TASK_CLASSES[cfg.task]
    model, info = build_model(cfg, task_cls.out_channels)
    size = model.encoder.arch["img_size"]
    task = task_cls(cfg, size, info["norm_mean"], info["norm_std"])
    train_ds = task.train_data()
    task.test_records()  # fail on a broken test split before spending time on training
    model.to(device)
    opt = build_optimizer(model, cfg)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    _atomic_json(os.path.join(cfg.out, "config.json"), {**vars(cfg), "encoder_info": info})

    ckpt = os.path.join(cfg.out, CKPT)
    start = load_checkpoint(ckpt, model, opt, cfg, ema) if cfg.resume and os.path.exists(ckpt) else 0
    end = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    if start:
        log.info("resuming %s from step %d", cfg.out, start)
    autocast = _autocast_for(device)
    t0 = time.time()
    if start < end:
        _train(cfg, model, opt, ema, task, train_ds, device, start, end, autocast)
    train_s = time.time() - t0
    if end < cfg.max_steps:
        log.info("stopped after step %d of %d (--stop-after); rerun without it to finish", end, cfg.max_steps)
        return {"stopped_at": end}

    if ema is not None:  # score the averaged weights, as FaRL does
        model.load_state_dict(ema.state)
    model.eval()
    t1 = time.time()
    metrics, viz = task.evaluate(model, device, cfg.num_viz, autocast)
    run_info = {"encoder": info["source"], "arch": info["arch"], "img_size": size, "freeze_backbone": cfg.freeze_backbone,
                "steps": cfg.max_steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "layer_decay": cfg.layer_decay,
                "seed": cfg.seed, "train_images": len(train_ds), "train_seconds": round(train_s, 2),
                "eval_seconds": round(time.time() - t1, 2), "device": str(device), "eval_split": cfg.eval_split,
                "protocol": cfg.protocol, "warp_factor": cfg.warp_factor, "ema_decay": cfg.ema_decay,
                "head_width": cfg.head_width, "backbone_lr_scale": cfg.backbone_lr_scale, "schedule": cfg.schedule}
    return _write_results(cfg, metrics, viz, run_info)
