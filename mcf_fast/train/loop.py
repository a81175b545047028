"""The training loop: wires config, data, masks, model, optimizer, EMA, checkpoints, logging and export."""
from __future__ import annotations

import json
import logging
import os
import resource
import time

import torch
import torch.distributed as dist

from mcf_fast.data import build_pretrain_loader
from mcf_fast.masking import random_masks
from mcf_fast.model.checkpoints import load_mae_decoder
from mcf_fast.model.mcf import MCFModel, ema_update
from mcf_fast.model.vit import save_encoder, set_attention_backend

from . import checkpoint as ckpt
from .config import Config, ModelConfig
from .logger import RunLogger, setup_logging, truncate_metrics
from .optim import build_optimizer, cosine_lr, ema_momentum, set_lr
from .runtime import Runtime, init_runtime
from .visualize import recon_grid, save_grid

log = logging.getLogger("mcf_fast")


class NonFiniteError(RuntimeError):
    pass


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
        grad_ckpt=m.grad_ckpt, teacher_grad_ckpt=m.teacher_grad_ckpt)
    if m.decoder_init:
        keys = load_mae_decoder(model, m.decoder_init, m.decoder_init_blocks)
        log.info("decoder initialised from %s (%d tensors)", m.decoder_init, len(keys))
    if m.compile:
        for blk in list(model.encoder.blocks) + list(model.decoder_blocks) + list(model.target_encoder.blocks):
            blk.compile()
    return model


def _check_config(cfg: Config, out: str, rank: int, world_size: int) -> None:
    """First run: save the resolved config. Rerun: it must match (or --run.allow_config_change), except
    that the per-rank batch may change with the world size when the global batch stays the same."""
    path = os.path.join(out, "config.json")
    new = {**cfg.to_dict(), "world_size": world_size}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s in new if isinstance(new[s], dict)
                for k, v in new[s].items() if s != "run" or k not in ("allow_config_change", "progress")
                if json.loads(json.dumps(v)) != old.get(s, {}).get(k)]
        old_world = old.get("world_size", world_size)
        if old_world != world_size and old["optim"]["batch_size"] * old_world == cfg.optim.batch_size * world_size:
            diff = [d for d in diff if not d.startswith("optim.batch_size:")]
            log.info("world size %d -> %d with the same global batch %d: resuming", old_world, world_size,
                     cfg.optim.batch_size * world_size)
        if diff and not cfg.run.allow_config_change:
            raise SystemExit(f"error: {out} holds a run with another config ({'; '.join(diff[:8])}). Use another "
                             "--out, or pass --run.allow_config_change true to resume with the new values.")
    if rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(new, f, indent=2)
        os.replace(path + ".tmp", path)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reduce(values: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    if rt.distributed:
        values = values.to(rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def train(cfg: Config) -> dict:
    """Run (or resume) the pre-training described by `cfg`; returns a summary dict."""
    t_start = time.perf_counter()
    rt = init_runtime(cfg.run.device, cfg.run.precision, cfg.dist.backend)
    out = cfg.run.out
    if rt.is_main:
        os.makedirs(out, exist_ok=True)
    if rt.distributed:
        dist.barrier()
    setup_logging(out, rt.rank)
    log.info("device %s, precision %s (%s), world size %d", rt.device, rt.precision, rt.why, rt.world_size)
    _check_config(cfg, out, rt.rank, rt.world_size)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
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
    optimizer = build_optimizer(model, base_lr, o.weight_decay, (o.beta1, o.beta2), rt.device)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]
    ema_t, ema_o = model.ema_pairs()

    # ---- resume
    ckpt_dir = os.path.join(out, "checkpoints")
    start, extra = 0, {}
    resume_from = ckpt.latest(ckpt_dir)
    if resume_from:
        extra = ckpt.load(resume_from, model, optimizer)
        start = int(extra["step"])
        loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["rng_cpu"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        log.info("resuming from %s at step %d/%d", resume_from, start, total)
        if rt.is_main:
            truncate_metrics(os.path.join(out, "metrics.jsonl"), start)
    elif rt.is_main:
        log.info("new run in %s: %d steps, effective batch %d (%d x %d accum x %d ranks), lr %.3g",
                 out, total, eff_batch, o.batch_size, o.accum_steps, rt.world_size, base_lr)
    logger = RunLogger(out, total, start, rt.is_main, cfg.run.progress, cfg.run.tensorboard)
    L = model.encoder.num_patches
    zero = torch.zeros((), device=rt.device)
    # Window accumulators stay on the device (no host sync per step); checkpoints carry them.
    win = {k: torch.as_tensor(v, device=rt.device) for k, v in extra.get("window", {}).items()} or \
        {k: zero.clone() for k in ("loss", "loss_perceptual", "loss_contrastive", "grad_norm", "steps")}
    consec_bad = torch.as_tensor(extra.get("consec_bad", 0.0), device=rt.device)
    skipped_total = torch.as_tensor(extra.get("skipped_total", 0.0), device=rt.device)
    t_win, data_win, n_in_win = time.perf_counter(), 0.0, 0
    it = iter(loader)
    step = start
    try:
        for step in range(start, total):
            lr = cosine_lr(step, total, warmup, base_lr, o.min_lr)
            set_lr(optimizer, lr)
            m = ema_momentum(step, total, o.momentum, o.momentum_schedule)
            step_loss = [zero.clone(), zero.clone(), zero.clone()]
            for micro in range(o.accum_steps):
                t0 = time.perf_counter()
                batch = next(it)
                data_win += time.perf_counter() - t0
                imgs = batch.images
                masks = random_masks(imgs.shape[0], L, cfg.model.mask_ratio, views=2, seed=cfg.run.seed,
                                     step=step * o.accum_steps + micro, sample_ids=batch.sample_ids,
                                     device=rt.device)
                ema_update(ema_t, ema_o, m)  # before k, every forward, as the reference does
                with rt.autocast():
                    res = model(imgs, masks.ids_keep[0], masks.ids_restore[0], masks.mask[0], masks.ids_keep[1],
                                rank=rt.rank, local_negatives=cfg.dist.negatives == "local")
                loss = res.loss.float() / o.accum_steps
                (scaler.scale(loss) if scaler else loss).backward()
                for acc, v in zip(step_loss, (res.loss, res.loss_perceptual, res.loss_contrastive)):
                    acc += v.detach().float() / o.accum_steps
            if scaler is not None:
                scaler.unscale_(optimizer)
            grads = [p.grad for p in params if p.grad is not None]
            if o.clip_grad > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad, foreach=True)
            else:
                gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
            bad = (~torch.isfinite(step_loss[0]) | ~torch.isfinite(gnorm)).float()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif optimizer.defaults.get("fused"):
                optimizer.found_inf = bad  # fused AdamW skips the update on the device: no host sync
                optimizer.grad_scale = None
                optimizer.step()
            elif not bool(bad):  # foreach fallback has no device-side skip
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            consec_bad = (consec_bad + 1) * bad
            skipped_total += bad
            good = 1.0 - bad
            for k, v in zip(("loss", "loss_perceptual", "loss_contrastive"), step_loss):
                win[k] += torch.nan_to_num(v) * good
            win["grad_norm"] += torch.nan_to_num(gnorm.float()) * good
            win["steps"] += good
            done = step + 1
            n_in_win += 1
            logger.advance(1)
            is_log = done % cfg.run.log_every == 0 or done == total
            if cfg.run.vis_every and (done % cfg.run.vis_every == 0) or done == total:
                if rt.is_main:
                    _write_vis(out, (imgs[:8].detach(), res.pred[:8].detach(), masks.mask[0][:8]), cfg, done, logger)
            if is_log:
                dt = time.perf_counter() - t_win
                vals = _reduce(torch.stack([win[k] for k in ("loss", "loss_perceptual", "loss_contrastive",
                                                             "grad_norm", "steps")]).float().cpu(), rt)
                n_ok = max(float(vals[4]), 1.0)
                n_steps = max(n_in_win, 1)
                stats = loader.stats() if hasattr(loader, "stats") else {}
                peak = _reduce(torch.tensor([_peak_mem_mb(rt.device)]), rt, dist.ReduceOp.MAX if rt.distributed
                               else None)
                row = {"step": done, "epoch": round(done / steps_per_epoch, 4),
                       "loss": float(vals[0]) / n_ok, "loss_perceptual": float(vals[1]) / n_ok,
                       "loss_contrastive": float(vals[2]) / n_ok, "grad_norm": float(vals[3]) / n_ok,
                       "lr": lr, "momentum": m, "images_per_s": n_steps * eff_batch / max(dt, 1e-9),
                       "step_time_s": dt / n_steps, "data_time_s": data_win / n_steps,
                       "peak_mem_mb": float(peak[0]), "skipped_nonfinite": int(skipped_total.item()),
                       "data_skipped": int(stats.get("skipped", 0)),
                       "data_skipped_by_reason": dict(stats.get("skipped_by_reason", {}))}
                logger.log(row)
                logger.advance(0, {"loss": f"{row['loss']:.4f}", "img/s": f"{row['images_per_s']:.1f}"})
                for k in win:
                    win[k].zero_()
                t_win, data_win, n_in_win = time.perf_counter(), 0.0, 0
                if int(consec_bad.item()) >= cfg.run.max_nonfinite:
                    raise NonFiniteError(
                        f"{int(consec_bad.item())} consecutive non-finite steps at step {done}: stopping. The last "
                        f"finite checkpoint is kept in {ckpt_dir}; lower the LR, set --optim.clip_grad, or use "
                        "--run.precision fp32.")
            if done % cfg.run.ckpt_every == 0 or done == total:
                _save(ckpt_dir, done, model, optimizer, loader, win, consec_bad, skipped_total, scaler, cfg, rt)
    finally:
        logger.close()
        if hasattr(loader, "close"):
            loader.close()
    summary = _finish(cfg, rt, model, out, start, total, t_start)
    return summary


def _write_vis(out, vis, cfg, step, logger):
    imgs, pred, mask = vis
    grid = recon_grid(imgs, pred, mask, cfg.model.patch_size, cfg.data.mean, cfg.data.std)
    save_grid(grid, os.path.join(out, "images"), step)
    logger.image("reconstruction", torch.from_numpy(grid).permute(2, 0, 1), step)


def _save(ckpt_dir, step, model, optimizer, loader, win, consec_bad, skipped_total, scaler, cfg, rt):
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    extra = {"step": step, "loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(),
             "window": {k: v.detach().cpu() for k, v in win.items()}, "consec_bad": consec_bad.detach().cpu(),
             "skipped_total": skipped_total.detach().cpu()}
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    path = ckpt.save(ckpt_dir, step, model, optimizer, extra, cfg.run.keep_last, finite)
    log.info("checkpoint %s%s", path, "" if finite else " (non-finite weights: older finite one kept)")


def _finish(cfg, rt, model, out, start, total, t_start) -> dict:
    summary = {"steps": total, "resumed_from": start, "wall_s": round(time.perf_counter() - t_start, 2)}
    if cfg.run.export:
        from .fsdp import full_encoder
        enc = full_encoder(model, rt)
        if rt.is_main:
            st, js = save_encoder(enc, out, extra={"source": "mcf_fast.pretrain", "steps": total,
                                                   "preset": cfg.preset})
            summary["encoder"] = st
    if rt.is_main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.info("done in %.1f s. Run folder %s: config.json, metrics.jsonl, train.log, tb/ (TensorBoard), "
                 "checkpoints/, images/recon_latest.png%s", summary["wall_s"], out,
                 ", encoder.safetensors + encoder.json" if cfg.run.export else "")
    return summary


__all__ = ["train", "build_model", "NonFiniteError"]
