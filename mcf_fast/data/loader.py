"""`build_pretrain_loader` and the torch (DataLoader) backend.

A `PretrainLoader` yields `Batch(images [N, 3, S, S] normalised float on the device, sample_ids int64
[N])` forever, epoch after epoch. Step b of epoch e on rank r is a pure function of (seed, e, b, r,
world size, batch size, data): see `sampling`. `state_dict()` holds (epoch, step) of the next batch,
so a resumed run continues with exactly the batches the uninterrupted run would have seen.

Bad samples (torch backend) are skipped and counted, never silent and never fatal: the slot is filled
by a deterministic substitute (another sample of the same epoch, probed by hash), so batches stay full
and every rank runs the same number of steps. `stats()` returns the counters for metrics.jsonl.
"""
from __future__ import annotations

import gc
import logging
import sys
from collections import Counter
from typing import NamedTuple

import numpy as np

from . import augment, sampling
from .config import DataConfig
from .decode import decode_rgb, resolve_decoder
from .reasons import BadSample

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    images: object      # torch.FloatTensor [N, 3, S, S], normalised, on the training device
    sample_ids: object  # torch.LongTensor [N], global sample ids


class BatchMaker:
    """Builds the batch of (epoch, step) for one rank: read, decode, augment, substitute bad samples."""

    def __init__(self, cfg: DataConfig, source, *, batch_size, rank, world_size, seed, drop_last):
        self.cfg, self.source = cfg, source
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.order = sampling.EpochOrder(source.counts, seed, cfg.shuffle_window)
        self.per_rank, self.steps_per_epoch = sampling.per_rank(
            source.num_samples, batch_size, world_size, drop_last)
        self.decoder = resolve_decoder(cfg.decoder)

    def ids(self, epoch: int, step: int) -> np.ndarray:
        start = sampling.step_start(step, self.batch_size, self.rank, self.world_size)
        return self.order.ids(epoch, start, start + self.batch_size)

    def load(self, sample_id: int) -> tuple[np.ndarray, str | None]:
        """Decoded RGB uint8 HWC image of one sample (raises BadSample)."""
        payload, _ = self.source.read(int(sample_id))
        if isinstance(payload, np.ndarray):
            return payload, None
        return decode_rgb(payload, self.decoder, self.cfg.min_image_size, self.cfg.max_pixels)

    def make(self, epoch: int, step: int, normalized: bool = False) -> dict:
        """uint8 [N,3,S,S] batch, or float32 normalised when `normalized` (CPU training device)."""
        cfg, S = self.cfg, self.cfg.img_size
        ids = self.ids(epoch, step)
        out = np.empty((len(ids), 3, S, S), np.float32 if normalized else np.uint8)
        mean, std = (cfg.mean, cfg.std) if normalized else (None, None)
        used = ids.copy()
        # one vectorised hash for the batch (per-sample numpy calls cost ~0.4 ms each)
        flips = sampling.flip_flags(self.seed, epoch, ids) if cfg.hflip else np.zeros(len(ids), bool)
        skipped, converted = Counter(), Counter()
        for n, sid in enumerate(ids):
            img = None
            for attempt in range(cfg.max_retries + 1):
                try:
                    img, note = self.load(sid)
                    if note:
                        converted[note] += 1
                    break
                except BadSample as e:
                    skipped[e.reason] += 1
                    # substitute: a hashed position of this epoch, the same in every run
                    pos = int(sampling.hash_u64(sampling.SALT_RETRY, self.seed, epoch, int(sid), attempt)
                              % np.uint64(self.order.total))
                    sid = int(self.order.ids(epoch, pos, pos + 1)[0])
            if img is None:
                raise RuntimeError(
                    f"{cfg.max_retries + 1} samples in a row were bad (last: {skipped.most_common(3)}); "
                    "the data is mostly unusable: run `python -m mcf_fast.data.scan` on it")
            if sid == ids[n]:
                flip = bool(flips[n])
            else:  # a substitute: its own flip bit
                flip = bool(cfg.hflip and sampling.flip_flags(self.seed, epoch, [sid])[0])
            used[n] = sid
            if not cfg.random_resized_crop:
                fast = augment.fast_square(img, S, flip, mean, std)
                if fast is not None:
                    out[n] = fast
                    continue
                img = augment.resize_center(img, S)
            else:
                box = sampling.rrc_boxes(self.seed, epoch, [sid], [img.shape[0]], [img.shape[1]],
                                         cfg.rrc_scale, cfg.rrc_ratio)[0]
                img = augment.crop_resize(img, box, S)
            chw = augment.to_chw(img, flip)
            out[n] = augment.normalize_np(chw, mean, std) if normalized else chw
        return {"images": out, "ids": used, "skipped": dict(skipped), "converted": dict(converted),
                "epoch": epoch, "step": step}


class _StepDataset:
    """Map-style dataset over (epoch, step) keys: each item is a whole batch (batch_size=None)."""

    def __init__(self, maker: BatchMaker, normalize_dtype=None):
        self.maker = maker
        self.normalize_dtype = normalize_dtype  # set: normalise here (CPU training device)

    def __getitem__(self, key):
        import torch
        d = self.maker.make(*key, normalized=self.normalize_dtype is not None)
        d["images"] = torch.from_numpy(d["images"])
        if self.normalize_dtype is not None and self.normalize_dtype != torch.float32:
            d["images"] = d["images"].to(self.normalize_dtype)
        d["ids"] = torch.from_numpy(d["ids"])
        return d


class _Steps:
    """Infinite (epoch, step) sequence starting at a given position (the DataLoader's sampler)."""

    def __init__(self, epoch, step, steps_per_epoch):
        self.epoch, self.step, self.spe = epoch, step, steps_per_epoch

    def __iter__(self):
        e, s = self.epoch, self.step
        while True:
            yield (e, s)
            s += 1
            if s == self.spe:
                e, s = e + 1, 0


def _worker_init(_):
    import signal

    import torch
    # A terminal's Ctrl-C reaches the whole process group: the training process stops at a step boundary
    # and shuts its workers down; a worker that died on the signal would fail that step's batch instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # workers are the parallelism; nested thread pools only thrash
    if augment.cv2 is not None:
        augment.cv2.setNumThreads(1)


class PretrainLoader:
    """Iterable of `Batch` over epochs forever; see the module docstring."""

    def __init__(self, cfg: DataConfig, source, maker: BatchMaker | None, *, batch_size, rank, world_size,
                 seed, device, backend="torch", dali=None):
        import torch
        self.cfg, self.source, self.maker = cfg, source, maker
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = torch.device(device)
        self.backend = backend
        self._dali = dali
        self.steps_per_epoch = (maker or dali).steps_per_epoch
        self.num_samples = source.num_samples
        self.epoch, self.step = 0, 0
        self._it = None
        self._counts = {"skipped": Counter(), "converted": Counter()}
        self._batches = 0
        self._dtype = getattr(torch, cfg.dtype)

    # --- iteration -------------------------------------------------------------------------------
    def _start(self):
        import torch
        self.close()
        if self._dali is not None:
            self._it = self._dali.iterate(self.epoch, self.step)
            return
        # CPU training: workers normalise in parallel; CUDA: uint8 crosses the bus, the GPU normalises
        ds = _StepDataset(self.maker, self._dtype if self.device.type == "cpu" else None)
        w = self.cfg.workers
        if w and "nvidia.dali" in sys.modules:
            gc.collect()  # unreferenced DALI pipelines must die before fork, not inside a worker
        pin = self.cfg.pin_memory and self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=_Steps(self.epoch, self.step, self.steps_per_epoch), num_workers=w,
            pin_memory=pin, prefetch_factor=self.cfg.prefetch if w else None, persistent_workers=False,
            worker_init_fn=_worker_init if w else None)
        self._it = iter(dl)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._start()
        d = next(self._it)
        assert (d["epoch"], d["step"]) == (self.epoch, self.step), "loader order broke"
        self._counts["skipped"].update(d["skipped"])
        self._counts["converted"].update(d["converted"])
        self._batches += 1
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        imgs = d["images"]
        if imgs.dtype.is_floating_point:  # normalised by DALI or by a CPU-side worker
            imgs = imgs.to(self.device, self._dtype, non_blocking=True)
        else:
            imgs = augment.normalize(imgs, self.cfg.mean, self.cfg.std, self._dtype, self.device)
        return Batch(imgs, d["ids"].to(self.device, non_blocking=True))

    # --- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_samples": self.num_samples,
                "skipped": dict(self._counts["skipped"]), "converted": dict(self._counts["converted"])}

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a saved (epoch, step). Data and seed must match; batch size and world size may
        change when the saved position (step x global batch) falls on a step of the new global batch
        (always at the same global batch): ranks interleave by step, so the samples stay the same."""
        for k in ("seed", "num_samples"):
            if k in sd and sd[k] != getattr(self, k):
                raise ValueError(
                    f"loader state was saved with {k}={sd[k]} but this loader has {k}={getattr(self, k)}; "
                    "an exact resume needs the same data and seed")
        old_global = int(sd.get("batch_size", self.batch_size)) * int(sd.get("world_size", self.world_size))
        new_global = self.batch_size * self.world_size
        pos = int(sd.get("step", 0)) * old_global
        if pos % new_global:
            raise ValueError(
                f"loader state is at epoch position {pos} (step {sd.get('step')} x global batch {old_global}), "
                f"which is not a step boundary of the new global batch {new_global} "
                f"({self.batch_size} x {self.world_size} ranks): keep the global batch, or resume at an epoch "
                "boundary")
        step = pos // new_global
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"loader state step={step} outside [0, {self.steps_per_epoch})")
        self.close()
        self.epoch, self.step = int(sd["epoch"]), step
        self._counts = {"skipped": Counter(sd.get("skipped", {})), "converted": Counter(sd.get("converted", {}))}

    def stats(self) -> dict:
        """Counters for metrics.jsonl: skipped samples (by reason, including problems met while
        indexing or excluded by scan), converted images (gray, cmyk, ...), batches served."""
        by = Counter(self._counts["skipped"])
        by.update(self.source.index_stats)
        conv = Counter(self._counts["converted"])
        if self.backend == "dali":  # DALI converts silently: report what scan counted instead
            conv.update(getattr(self.source, "index_converted", {}))
        return {"skipped": int(sum(by.values())), "skipped_by_reason": dict(sorted(by.items())),
                "converted": int(sum(conv.values())), "converted_by_reason": dict(sorted(conv.items())),
                "batches": self._batches, "epoch": self.epoch, "step": self.step, "backend": self.backend}

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif it is not None and hasattr(it, "close"):
            it.close()  # the DALI generator: drops its pipeline
        if self._dali is not None:
            # release DALI's threads now: a later fork (DataLoader workers) must not inherit them
            self._dali.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def build_pretrain_loader(cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                          seed: int = 0, device="cpu", drop_last: bool = True) -> PretrainLoader:
    """The pre-training loader for `cfg` (see the module docstring and docs/ARCHITECTURE.md)."""
    from .sources import open_data
    cfg.validate()
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need "
                         "batch_size >= 1 and 0 <= rank < world_size")
    source = open_data(cfg, seed, need=batch_size * world_size if drop_last else 1)
    backend = cfg.loader
    if backend in ("auto", "dali"):
        from .dali import choose_backend
        backend, note = choose_backend(cfg, source, device)
        if note:
            log.info("data.loader=auto -> torch (%s)", note)
    if backend == "dali":
        from .dali import DaliBackend
        dali = DaliBackend(cfg, source, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                           device=device, drop_last=drop_last)
        return PretrainLoader(cfg, source, None, batch_size=batch_size, rank=rank, world_size=world_size,
                              seed=seed, device=device, backend="dali", dali=dali)
    maker = BatchMaker(cfg, source, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       drop_last=drop_last)
    return PretrainLoader(cfg, source, maker, batch_size=batch_size, rank=rank, world_size=world_size,
                          seed=seed, device=device)
