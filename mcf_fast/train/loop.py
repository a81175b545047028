"""The training loop: the wiring (runtime, run folder, model, loader, optimizer, resume) and the cadence
(metrics rows, pictures, checkpoints) around `step.TrainStep`, which is the step itself.

    train(cfg)
      runfolder.claim / finished_summary / check_config     the run folder's lifecycle (runfolder.py)
      wire(cfg, rt) -> Wiring                                model, loader, schedule, optimizer
      resume(w) -> (start, saved)                            newest checkpoint, or a fresh start
      run_steps(w, start, saved)                             per step: TrainStep, MetricsWindow.add, then
        write_picture / log_window / save_checkpoint          the cadence
      _finish                                                 export + summary.json
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from mcf_fast.data import build_pretrain_loader
from mcf_fast.model.card import write_model_card
from mcf_fast.model.checkpoints import load_mae_decoder
from mcf_fast.model.init_from import init_from_checkpoint
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import save_encoder, set_attention_backend

from . import checkpoint as ckpt
from . import runfolder, visualize
from .config import Config, ModelConfig
from .heldout import heldout_snapshot
from .logger import RunLogger, setup_logging, truncate_metrics
from .optim import build_optimizer, cosine_lr, ema_momentum
from .runtime import Runtime, init_runtime
from .step import StepResult, TrainStep
from .window import MetricsWindow, NonFiniteError, TimedBatches

log = logging.getLogger("mcf_fast")


def build_model(m: ModelConfig, seed: int) -> MCFModel:
    """The MCF model for a ModelConfig, initialised from `seed` (the teacher from its own seed)."""
    torch.manual_seed(seed)
    set_attention_backend(m.attention)
    model = MCFModel(
        img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, teacher=m.teacher,
        teacher_arch=dict(img_size=m.teacher_img_size, patch_size=m.teacher_patch_size,
                          embed_dim=m.teacher_embed_dim, depth=m.teacher_depth, num_heads=m.teacher_num_heads),
        teacher_layers=tuple(int(i) for i in m.teacher_layers), teacher_num_heads=m.teacher_num_heads,
        teacher_seed=seed + 1, norm_pix_loss=m.norm_pix_loss, temperature=m.temperature,
        perceptual_weight=m.perceptual_weight, contrastive_weight=m.contrastive_weight, embed_mode=m.embed_mode,
        grad_ckpt=m.grad_ckpt, teacher_grad_ckpt=m.teacher_grad_ckpt, head_init=m.head_init,
        patch_embed_bias=m.patch_embed_bias, teacher_resize=m.teacher_resize)
    if m.decoder_init:
        keys = load_mae_decoder(model, m.decoder_init, m.decoder_init_blocks)
        log.info("decoder initialised from %s (%d tensors)", m.decoder_init, len(keys))
    if m.init:
        for line in init_from_checkpoint(model, m.init):
            log.info("init: %s", line)
    if m.compile:
        for blk in list(model.encoder.blocks) + list(model.decoder_blocks) + list(model.target_encoder.blocks):
            blk.compile()
    return model


@dataclass
class Wiring:
    """What `train` builds once and the cadence functions share."""
    cfg: Config
    rt: Runtime
    out: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loader: object
    total: int  # optimizer steps of the whole run
    warmup: int
    base_lr: float
    eff_batch: int  # images per optimizer step over all ranks
    steps_per_epoch: int

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out, "checkpoints")


def train(cfg: Config) -> dict:
    """Run (or resume) the pre-training described by `cfg`; returns a summary dict."""
    t_start = time.perf_counter()
    rt = init_runtime(cfg.run.device, cfg.run.precision, cfg.dist.backend)
    out = cfg.run.out
    lock = runfolder.claim(out, rt)  # before anything in the folder is read or written
    try:
        setup_logging(None, rt.rank)  # console only until we know there is work to do
        latest = ckpt.latest(os.path.join(out, "checkpoints"))  # once: it verifies every file's digest
        done = runfolder.finished_summary(cfg, out, rt.world_size, latest)
        if done is not None:
            return _nothing_to_do(out, done)
        setup_logging(out, rt.rank)
        log.info("device %s, precision %s (%s), world size %d", rt.device, rt.precision, rt.why, rt.world_size)
        runfolder.check_config(cfg, out, rt, latest is not None)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        w = wire(cfg, rt)
        try:
            start, saved = resume(w, latest)
            prior = runfolder.read_summary(out)  # a finished run resumed with an allowed config change
            if start >= w.total and prior is not None and prior.get("steps") == start:
                return _nothing_to_do(out, prior)
            run_steps(w, start, saved)
        finally:
            if hasattr(w.loader, "close"):
                w.loader.close()
        return _finish(w, start, t_start)
    finally:
        lock.release()


def wire(cfg: Config, rt: Runtime) -> Wiring:
    """Model (sharded under torchrun), loader, schedule lengths, optimizer, grad scaler."""
    model = build_model(cfg.model, cfg.run.seed).to(rt.device)
    model.train()
    if rt.distributed:
        from .fsdp import shard_model
        model = shard_model(model, cfg, rt)
    o = cfg.optim
    loader = build_pretrain_loader(cfg.data, batch_size=o.batch_size, rank=rt.rank, world_size=rt.world_size,
                                   seed=cfg.run.seed, device=rt.device)
    eff_batch = o.batch_size * o.accum_steps * rt.world_size
    steps_per_epoch = max(1, loader.steps_per_epoch // o.accum_steps)
    total = o.max_steps or max(1, int(round(o.epochs * steps_per_epoch)))
    warmup = o.warmup_steps or int(round(o.warmup_epochs * steps_per_epoch))
    base_lr = o.lr if o.lr > 0 else o.blr * eff_batch / 256
    optimizer = build_optimizer(model, base_lr, o.weight_decay, (o.beta1, o.beta2), rt.device, o.decay_tokens)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    return Wiring(cfg, rt, cfg.run.out, model, optimizer, scaler, loader, total, warmup, base_lr, eff_batch,
                  steps_per_epoch)


def resume(w: Wiring, path: str | None) -> tuple[int, dict]:
    """(first step, saved counters) from checkpoint `path` (`ckpt.latest`), or 0 and {} for a fresh start,
    which also empties metrics.jsonl (rows of an earlier attempt that never checkpointed must not repeat)."""
    metrics = os.path.join(w.out, "metrics.jsonl")
    if path is None:
        if w.rt.is_main:
            truncate_metrics(metrics, 0)
            o = w.cfg.optim
            log.info("new run in %s: %d steps, effective batch %d (%d x %d accum x %d ranks), lr %.3g", w.out,
                     w.total, w.eff_batch, o.batch_size, o.accum_steps, w.rt.world_size, w.base_lr)
        return 0, {}
    saved = ckpt.load(path, w.model, w.optimizer)
    start = int(saved["step"])
    w.loader.load_state_dict(saved["loader"])
    torch.set_rng_state(saved["rng_cpu"])
    if w.scaler is not None and "scaler" in saved:
        w.scaler.load_state_dict(saved["scaler"])
    log.info("resuming from %s at step %d/%d", path, start, w.total)
    if w.rt.is_main:
        truncate_metrics(metrics, start)
    return start, saved


def run_steps(w: Wiring, start: int, saved: dict) -> None:
    """Steps `start`..`total` with their cadence: a metrics row every log_every, a picture every
    vis_every, a checkpoint every ckpt_every (each also at the last step)."""
    cfg, o = w.cfg, w.cfg.optim
    step = TrainStep(w.model, w.optimizer, cfg, w.rt, w.scaler)
    logger = RunLogger(w.out, w.total, start, w.rt.is_main, cfg.run.progress, cfg.run.tensorboard)
    window = MetricsWindow(w.rt.device, saved)
    batches = TimedBatches(iter(w.loader))
    try:
        for i in range(start, w.total):
            lr = cosine_lr(i, w.total, w.warmup, w.base_lr, o.min_lr, o.warmup_from_zero)
            m = ema_momentum(i, w.total, o.momentum, o.momentum_schedule)
            res = step(batches, i, lr, m)
            window.add(res)
            done = i + 1
            logger.advance(1)
            if visualize.due(done, cfg.run.vis_every, w.total):
                write_picture(w, res, done, logger)
            if done % cfg.run.log_every == 0 or done == w.total:
                log_window(w, window, batches, logger, done, lr, m)
            if done % cfg.run.ckpt_every == 0 or done == w.total:
                save_checkpoint(w, done, window)
    finally:
        logger.close()


def write_picture(w: Wiring, res: StepResult, done: int, logger: RunLogger) -> None:
    """Rank 0: the reconstruction grid of the fixed held-out faces (a sharded model: of this batch)."""
    if not w.rt.is_main:
        return
    cfg = w.cfg
    fixed = None if w.rt.distributed else heldout_snapshot(w.model, cfg.data, cfg.model, cfg.run.seed, w.rt.device)
    imgs, pred, mask = fixed or (res.images, res.pred, res.mask)
    visualize.write_reconstruction(w.out, imgs, pred, mask, cfg.model.patch_size, cfg.data.mean, cfg.data.std, done,
                                   logger)


def log_window(w: Wiring, window: MetricsWindow, batches: TimedBatches, logger: RunLogger, done: int, lr: float,
               m: float) -> None:
    """Write the window's metrics row (the only host read of the step results); stop on a non-finite streak."""
    every = w.cfg.run.log_every
    stats = w.loader.stats() if hasattr(w.loader, "stats") else {}
    row = window.row(done, done - (done - 1) // every * every, w.rt, epoch=round(done / w.steps_per_epoch, 4),
                     lr=lr, momentum=m, eff_batch=w.eff_batch, data_s=batches.take_wait(), data_stats=stats)
    logger.log(row)
    logger.advance(0, {"loss": "n/a" if row["loss"] is None else f"{row['loss']:.4f}",
                       "img/s": f"{row['images_per_s']:.1f}"})
    bad = window.consecutive_bad()
    if bad >= w.cfg.run.max_nonfinite:
        raise NonFiniteError(
            f"{bad} consecutive non-finite steps at step {done}: stopping. The last finite checkpoint is kept in "
            f"{w.ckpt_dir}; lower the LR, set --optim.clip_grad, or use --run.precision fp32.")


def save_checkpoint(w: Wiring, done: int, window: MetricsWindow) -> None:
    """A complete checkpoint of step `done` (all ranks): model, optimizer, data position, RNG, counters."""
    finite = all(bool(torch.isfinite(p).all()) for p in w.model.parameters() if p.requires_grad)
    extra = {"step": done, "loader": w.loader.state_dict(), "rng_cpu": torch.get_rng_state(), **window.state()}
    if w.scaler is not None:
        extra["scaler"] = w.scaler.state_dict()
    path = ckpt.save(w.ckpt_dir, done, w.model, w.optimizer, extra, w.cfg.run.keep_last, finite)
    log.info("checkpoint %s%s", path, "" if finite else " (non-finite weights: older finite one kept)")


def _nothing_to_do(out: str, summary: dict) -> dict:
    log.info("already finished at step %s (%s); nothing to do", summary.get("steps"),
             os.path.join(out, "summary.json"))
    return summary


def _finish(w: Wiring, start: int, t_start: float) -> dict:
    """Export the encoder and write summary.json (rank 0)."""
    cfg, rt, out = w.cfg, w.rt, w.out
    summary = {"steps": w.total, "resumed_from": start, "wall_s": round(time.perf_counter() - t_start, 2)}
    if cfg.run.export:
        from .fsdp import full_encoder
        enc = full_encoder(w.model, rt)
        if rt.is_main:
            st, js = save_encoder(enc, out, extra={"source": "mcf_fast.pretrain", "steps": w.total,
                                                   "preset": cfg.preset})
            summary["encoder"] = st
            write_model_card(out, cfg.to_dict(), steps=w.total, steps_per_epoch=w.steps_per_epoch, eff_batch=w.eff_batch,
                             num_samples=getattr(w.loader, "num_samples", None), world_size=rt.world_size,
                             precision=rt.precision)
    if rt.is_main:
        path = os.path.join(out, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
        log.info("done in %.1f s. Run folder %s: config.json, metrics.jsonl, train.log, summary.json, tb/ "
                 "(TensorBoard), checkpoints/, images/recon_latest.png%s", summary["wall_s"], out,
                 ", encoder.safetensors + encoder.json" if cfg.run.export else "")
    return summary


__all__ = ["train", "build_model", "wire", "resume", "run_steps", "NonFiniteError", "Wiring"]
