"""The fine-tuning loop: build, check memory, (resume,) train for --max-steps scoring on a schedule, write
the run folder.

A run folder explains itself: config.json, eval.log, metrics.jsonl (training rows every --log-every
steps, a row per scoring of the test split, a final row with the last and the best score: see
`runlog`), ckpt.pt (atomic; rerunning the same command resumes from it), metrics.json, metrics.md
and predictions.png.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time

import torch

from .config import EvalConfig, eval_every_steps
from .encoders import build_encoder, param_groups
from .evaluation import EvalHistory, due, scored_weights
from .heads import dense_model
from .identity import encoder_digest
from .memory import check_memory
from .results import write_results
from .runlog import append_row, atomic_json, run_log, truncate_rows
from .tasks import TASK_CLASSES
from .transforms import StepBatches
from .uper import farl_param_groups

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
        raise ValueError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
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


class Ema:
    """Exponential moving average of every float parameter and buffer; integer buffers are copied. FaRL
    scores `main_ema` (decay 0.999, trainers/*_farl.yaml), updated after every optimizer step from the
    first (blueprint ml/trainer.py `_optimizer_step`), BN buffers averaged too (blueprint ml/util.py
    `accumulate`): `warmup=False`. With `warmup=True` (ours) the decay at update t is
    min(decay, (1 + t) / (10 + t)), so a 1,000-step run is not scored on weights still 37% its initial ones."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)


def save_checkpoint(path: str, model, opt, step: int, cfg: EvalConfig, ema: Ema | None = None,
                    history: EvalHistory | None = None) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "fingerprint": cfg.fingerprint(), "evals": history.records if history else []}
    if ema is not None:
        state["ema"] = ema.state
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a checkpoint counts only once it is complete


def load_checkpoint(path: str, model, opt, cfg: EvalConfig, ema: Ema | None = None,
                    history: EvalHistory | None = None) -> int:
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
    if history is not None:
        history.records = list(state.get("evals", []))
    return int(state["step"])


def build_model(cfg: EvalConfig, out_channels: int):
    enc, info = build_encoder(cfg.encoder, cfg.arch or None, cfg.img_size or None, cfg.seed)
    r = cfg.resolved()  # idempotent: callers may pass the command line's config
    model = dense_model(enc, out_channels, protocol=r.protocol, head_width=r.head_width, head_init=r.head_init,
                        freeze_backbone=cfg.freeze_backbone, seed=cfg.seed)
    return model, info


def build_optimizer(model, cfg: EvalConfig) -> torch.optim.Optimizer:
    if cfg.protocol == "farl":
        groups = farl_param_groups(model, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale)
    else:
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        for g in groups:
            g["lr_scale"] *= cfg.backbone_lr_scale if g.get("layer", 0) <= len(model.encoder.blocks) else 1.0
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def autocast_for(device: torch.device, precision: str):
    """fp32: no autocast (FaRL: enable_amp False, the network .float()); bf16: bf16 autocast; auto: bf16 on a
    GPU, fp32 on a CPU (where bf16 autocast is slower on most machines)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
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


@dataclasses.dataclass
class Run:
    """Everything one fine-tuning run holds while it trains and scores."""
    cfg: EvalConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: Ema | None
    task: object
    device: torch.device
    autocast: object
    history: EvalHistory
    steps_per_epoch: int
    every: int

    def score(self, step: int, num_viz: int = 0):
        """Score the test split on the scored weights; record it (history + metrics.jsonl); (metrics, viz)."""
        with scored_weights(self.model, self.ema.state if self.ema else None):
            metrics, viz = self.task.evaluate(self.model, self.device, num_viz, self.autocast)
        rec = self.history.add(step, step / self.steps_per_epoch, metrics)
        append_row(os.path.join(self.cfg.out, "metrics.jsonl"), {"kind": "eval", **rec})
        key = self.history.key
        log.info("step %d (epoch %.2f): %s %s", step, rec["epoch"], key, rec.get(key))
        return metrics, viz


def _train(r: Run, train_ds, start: int, end: int) -> None:
    """Steps start..end-1 with metrics rows, scoring on schedule, a progress bar and checkpoints."""
    cfg, model = r.cfg, r.model
    model.train()
    sampler = StepBatches(len(train_ds), cfg.batch_size, cfg.seed, start, end)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.task, dynamic_ncols=True)
    t0, rows = time.time(), os.path.join(cfg.out, "metrics.jsonl")
    for step, batch in zip(range(start, end), loader):
        loss, logs, scale = _step(cfg, model, r.opt, r.ema, r.task, batch, r.device, step, r.autocast)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            rec = {"kind": "train", "step": done, "loss": float(loss.detach()),
                   **{k: float(v.detach()) for k, v in logs.items()}, "lr": cfg.lr * scale,
                   "elapsed_s": round(time.time() - t0, 3)}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss became {rec['loss']} at step {done}; lower --lr "
                                         "or raise --warmup-steps")
            append_row(rows, rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if bar is not None:
            bar.update(1)
        if due(done, r.every, cfg.max_steps):
            r.score(done)
        if done == end or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
            save_checkpoint(os.path.join(cfg.out, CKPT), model, r.opt, done, cfg, r.ema, r.history)
    if bar is not None:
        bar.close()


def prepared(cfg: EvalConfig) -> EvalConfig:
    """The resolved, validated configuration with the encoder's content digest in its fingerprint."""
    cfg = cfg.validate().resolved()
    if cfg.encoder_digest:  # given by `paper`, which hashed the files moments ago
        return cfg
    return dataclasses.replace(cfg, encoder_digest=encoder_digest(cfg.encoder, cfg.arch))


def run(cfg: EvalConfig) -> dict:
    """Train and score; returns the last scores with the best one (also written to OUT/metrics.json)."""
    cfg = prepared(cfg)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    task_cls = TASK_CLASSES[cfg.task]
    model, info = build_model(cfg, task_cls.out_channels)
    size = model.encoder.arch["img_size"]
    task = task_cls(cfg, size, info["norm_mean"], info["norm_std"])
    train_ds = task.train_data()
    task.test_records()  # fail on a broken test split before spending time on training
    estimate = check_memory(cfg, model.encoder.arch, task_cls)  # before anything is written
    os.makedirs(cfg.out, exist_ok=True)
    with run_log(cfg.out):
        log.info("memory estimate: %s", estimate.text())
        return _run(cfg, device, model, info, task, train_ds)


def _run(cfg: EvalConfig, device, model, info: dict, task, train_ds) -> dict:
    model.to(device)
    opt = build_optimizer(model, cfg)
    ema = Ema(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    atomic_json(os.path.join(cfg.out, "config.json"), {**vars(cfg), "encoder_info": info})
    spe = max(1, math.ceil(len(train_ds) / cfg.batch_size))
    r = Run(cfg, model, opt, ema, task, device, autocast_for(device, cfg.precision), EvalHistory(cfg.task), spe,
            eval_every_steps(cfg.eval_every, spe))
    ckpt = os.path.join(cfg.out, CKPT)
    start = load_checkpoint(ckpt, model, opt, cfg, ema, r.history) if cfg.resume and os.path.exists(ckpt) else 0
    truncate_rows(os.path.join(cfg.out, "metrics.jsonl"), start, cfg.max_steps)
    end = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    log.info("%s %s: %s; encoder %s (sha256 %s); %s, %d steps x batch %d, scoring %s", "resuming" if start else
             "run", cfg.out, cfg.task, info["source"], cfg.encoder_digest[:16], cfg.protocol, cfg.max_steps,
             cfg.batch_size, f"every {r.every} steps" if r.every else "after the last step")
    t0 = time.time()
    if start < end:
        _train(r, train_ds, start, end)
    train_s = time.time() - t0
    if end < cfg.max_steps:
        log.info("stopped after step %d of %d (--stop-after); rerun without it to finish", end, cfg.max_steps)
        return {"stopped_at": end}
    t1 = time.time()
    metrics, viz = r.score(cfg.max_steps, cfg.num_viz)
    run_info = {"encoder": info["source"], "encoder_sha256": cfg.encoder_digest, "arch": info["arch"],
                "img_size": task.size, "freeze_backbone": cfg.freeze_backbone, "steps": cfg.max_steps,
                "steps_per_epoch": spe, "batch_size": cfg.batch_size, "lr": cfg.lr, "layer_decay": cfg.layer_decay,
                "seed": cfg.seed, "train_images": len(train_ds), "train_seconds": round(train_s, 2),
                "eval_seconds": round(time.time() - t1, 2), "device": str(device), "eval_split": cfg.eval_split,
                "protocol": cfg.protocol, "warp_factor": cfg.warp_factor, "ema_decay": cfg.ema_decay,
                "head_width": cfg.head_width, "backbone_lr_scale": cfg.backbone_lr_scale, "schedule": cfg.schedule,
                "eval_every": cfg.eval_every, "choices": cfg.choices()}
    return write_results(cfg, metrics, viz, run_info, r.history)
