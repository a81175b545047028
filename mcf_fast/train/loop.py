"""The training loop: the wiring (runtime, run folder, model, loader, optimizer, resume) and the cadence
(metrics rows, pictures, checkpoints) around `step.TrainStep`, which is the step itself.

    train(cfg)
      validate / check_inputs / init_runtime / MCFModel.from_config
                                                             every refusal of the inputs (BadInput), before
                                                             anything is written
      runfolder.claim / finished_summary / check_config     the run folder's lifecycle (runfolder.py)
      wire(cfg, rt, model) -> Wiring                         FSDP2, loader, schedule, optimizer
      resume(w) -> (start, saved)                            newest checkpoint, or a fresh start
      run_steps(w, start, saved)                             per step: TrainStep, MetricsWindow.add, then
        write_picture / log_window / save_checkpoint          the cadence
        StopVote.poll -> _stop                                Ctrl-C / SIGTERM: stop here (interrupt.py)
      _finish                                                 export + summary.json
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch

from mcf_fast.data import build_pretrain_loader
from mcf_fast.model.card import write_model_card
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import save_encoder
from mcf_fast.plan.check import check_fits

from . import checkpoint as ckpt
from . import runfolder, visualize
from .checks import BadInput, check_inputs
from .config import Config
from .heldout import heldout_snapshot, picture_images
from .interrupt import Interrupted, StopSignals, StopVote
from .logger import RunLogger, setup_logging, truncate_metrics
from .optim import build_optimizer, cosine_lr, ema_momentum
from .runtime import Runtime, init_runtime
from .step import StepResult, TrainStep
from .window import MetricsWindow, NonFiniteError, TimedBatches

log = logging.getLogger("mcf_fast")


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
    """Run (or resume) the pre-training described by `cfg`; returns a summary dict.

    Everything that can refuse the inputs runs before the run folder is touched: the config checks, the
    device and precision, and the model build (which reads the teacher, decoder_init and init files);
    their errors are `BadInput` (one line, exit 2 from the CLI) and nothing has been written."""
    t_start = time.perf_counter()
    rank = os.environ.get("RANK", "0")
    setup_logging(None, int(rank) if rank.isdigit() else 0)  # console only until the folder is ours
    with _bad_input(), _held_records() as early:
        cfg.validate()
        check_inputs(cfg)
        rt = init_runtime(cfg.run.device, cfg.run.precision, cfg.dist.backend)
        check_fits(cfg, rt.world_size, rt.device)  # GPU only: refuse what cannot fit before anything is built
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        model = MCFModel.from_config(cfg.model, seed=cfg.run.seed)
    out = cfg.run.out
    lock = runfolder.claim(out, rt)  # before anything in the folder is read or written
    try:
        latest = ckpt.latest(os.path.join(out, "checkpoints"))  # once: it verifies every file's digest
        done = runfolder.finished_summary(cfg, out, rt.world_size, latest)
        if done is not None:
            return _nothing_to_do(out, done)
        setup_logging(out, rt.rank)
        _to_log_file(early)  # what building the model said (teacher, decoder_init, init) goes to train.log too
        log.info("device %s, precision %s (%s), world size %d", rt.device, rt.precision, rt.why, rt.world_size)
        runfolder.check_config(cfg, out, rt, latest is not None)
        w = wire(cfg, rt, model)
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


@contextlib.contextmanager
def _bad_input():
    """Errors about the inputs, raised before the run folder is touched, as `BadInput` (one line)."""
    try:
        yield
    except BadInput:
        raise
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise BadInput(" ".join(str(e).split())) from e


class _Held(logging.Handler):
    """Keeps records in memory (the build's log lines, written to train.log once the folder is ours)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _held_records():
    """The INFO records logged inside the block, to copy them into train.log once it exists."""
    held = _Held()
    root = logging.getLogger("mcf_fast")
    root.addHandler(held)
    try:
        yield held.records
    finally:
        root.removeHandler(held)


def _to_log_file(records: list[logging.LogRecord]) -> None:
    for h in logging.getLogger("mcf_fast").handlers:
        if isinstance(h, logging.FileHandler):
            for r in records:
                h.handle(r)


def wire(cfg: Config, rt: Runtime, model: MCFModel | None = None) -> Wiring:
    """Model (built from the config unless given; sharded under torchrun), loader, schedule lengths,
    optimizer, grad scaler."""
    model = (model or MCFModel.from_config(cfg.model, seed=cfg.run.seed)).to(rt.device)
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


@dataclass
class Kept:
    """The newest complete finite checkpoint: its step and when it was written (monotonic seconds)."""
    step: int
    at: float


def run_steps(w: Wiring, start: int, saved: dict) -> None:
    """Steps `start`..`total` with their cadence: a metrics row every log_every, a picture every
    vis_every, a checkpoint every ckpt_every (each also at the last step). Ctrl-C / SIGTERM stop it at a
    step boundary with `interrupt.Interrupted` (see interrupt.py)."""
    cfg, o = w.cfg, w.cfg.optim
    step = TrainStep(w.model, w.optimizer, cfg, w.rt, w.scaler)
    logger = RunLogger(w.out, w.total, start, w.rt.is_main, cfg.run.progress, cfg.run.tensorboard)
    window = MetricsWindow(w.rt.device, saved, {n: t.weight for n, t in w.model.loss_terms.items()})
    batches = TimedBatches(iter(w.loader))
    kept = Kept(start, time.monotonic())  # the checkpoint a rerun would resume from (start: the one we did)
    done = start
    with StopSignals() as signals:
        vote = StopVote(w.rt.distributed)
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
                    kept = save_checkpoint(w, done, window) or kept
                if vote.poll(signals.requested) and done < w.total:
                    _stop(w, window, done, kept, vote)
            vote.close()
        except Interrupted:
            raise
        except KeyboardInterrupt:  # a second signal: no checkpoint, no collective (other ranks may be gone)
            e = Interrupted(done, kept.step, at_once=True)
            _say(w, e)
            raise e from None
        finally:
            logger.close()


def _stop(w: Wiring, window: MetricsWindow, done: int, kept: Kept, vote: StopVote) -> None:
    """All ranks, at the same boundary after a signal: a checkpoint when more than the allowed seconds of
    training would be lost without one, then `Interrupted`."""
    vote.close()
    lost_s = time.monotonic() - kept.at
    if kept.step < done and vote.agree(lost_s >= w.cfg.run.interrupt_ckpt_after_s):
        kept = save_checkpoint(w, done, window) or kept
    e = Interrupted(done, kept.step)
    _say(w, e)
    raise e


def _say(w: Wiring, e: Interrupted) -> None:
    if w.rt.is_main:
        log.warning("%s", e)


def write_picture(w: Wiring, res: StepResult, done: int, logger: RunLogger) -> None:
    """The reconstruction grid of the run's fixed images (heldout.picture_images: synthetic held-out faces,
    or a saved set of the user's data; this batch when the data has no source to pick from). All ranks
    call it: a sharded model reconstructs on every rank together; rank 0 writes the files."""
    cfg, main = w.cfg, w.rt.is_main
    imgs = picture_images(w.out, cfg.data, cfg.model.img_size, cfg.run.seed, getattr(w.loader, "source", None),
                          save=main)
    fixed = None if imgs is None else heldout_snapshot(w.model, imgs, cfg.model, w.rt.device)
    if main:
        imgs, pred, mask = fixed or (res.images, res.pred, res.mask)
        visualize.write_reconstruction(w.out, imgs, pred, mask, cfg.model.patch_size, cfg.data.mean, cfg.data.std,
                                       done, logger)


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


def save_checkpoint(w: Wiring, done: int, window: MetricsWindow) -> Kept | None:
    """A complete checkpoint of step `done` (all ranks): model, optimizer, data position, RNG, counters.
    Returns what a rerun resumes from now, or None when the weights were not finite (the older finite
    checkpoint stays the one to resume from)."""
    finite = all(bool(torch.isfinite(p).all()) for p in w.model.parameters() if p.requires_grad)
    extra = {"step": done, "loader": w.loader.state_dict(), "rng_cpu": torch.get_rng_state(), **window.state()}
    if w.scaler is not None:
        extra["scaler"] = w.scaler.state_dict()
    path = ckpt.save(w.ckpt_dir, done, w.model, w.optimizer, extra, w.cfg.run.keep_last, finite)
    log.info("checkpoint %s%s", path, "" if finite else " (non-finite weights: older finite one kept)")
    return Kept(done, time.monotonic()) if finite else None


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
                                                   "preset": cfg.preset}, mean=cfg.data.mean, std=cfg.data.std)
            summary["encoder"] = st
            write_model_card(out, cfg.to_dict(), steps=w.total, steps_per_epoch=w.steps_per_epoch, eff_batch=w.eff_batch,
                             num_samples=getattr(w.loader, "num_samples", None), world_size=rt.world_size,
                             precision=rt.precision)
    if rt.is_main:
        runfolder.write_json(os.path.join(out, "summary.json"), summary)  # atomic and fsynced
        log.info("done in %.1f s. Run folder %s: config.json, metrics.jsonl, train.log, summary.json, tb/ "
                 "(TensorBoard), checkpoints/, images/recon_latest.png%s", summary["wall_s"], out,
                 ", encoder.safetensors + encoder.json + MODEL_CARD.md" if cfg.run.export else "")
    return summary


__all__ = ["train", "wire", "resume", "run_steps", "NonFiniteError", "Wiring"]
