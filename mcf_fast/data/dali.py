"""NVIDIA DALI backend: decode + augmentation in DALI, order and resume from `sampling`.

Design: the sample order must be the one `sampling.EpochOrder` defines (exact mid-epoch resume, same
samples as the torch loader), so Python reads each sample's encoded bytes by index-file offset (one
pread, no decoding) and feeds them with the per-sample flip bit and crop box to
`fn.external_source`. DALI then does the heavy part: `fn.decoders.image` (device "mixed" = nvJPEG /
the hardware decoder on a GPU, "cpu" with device_id=None otherwise), `fn.resize` (shorter side to S,
antialiased) or the random-resized-crop box via `fn.decoders.image_slice`, and one fused
`fn.crop_mirror_normalize` (central S x S crop, mirror, ImageNet mean/std, NCHW, fp32/fp16).
DALI's own `fn.readers.webdataset` uses the same index files (see `webdataset_reader_pipeline`, used
by the benchmark) but shuffles with its own buffer, which cannot resume mid-epoch exactly.

Bad data: one undecodable image makes `pipe.run()` raise for the whole batch, so this backend only
reads validated shards (index files + manifest from `prepare` / `scan --write-index`, which leave bad
samples out and record their counts, reported by `stats()`); unvalidated shards are refused with the
command to run. Which kinds of source DALI reads is each registry entry's `dali` flag (`sources.py`).
`data.loader=auto` picks DALI only on a CUDA device and, on a CPU or for synthetic faces, says nothing
about it (the torch loader is the right choice there, not a fallback).
"""
from __future__ import annotations

import numpy as np

from . import sampling
from .sources import SOURCES, dali_readable


def _dali():
    import nvidia.dali
    return nvidia.dali


def _on_cuda(device) -> bool:
    return str(device).split(":")[0] == "cuda"


def _reads(source) -> bool:
    """Whether the registry entry that built `source` says DALI can read its kind."""
    kind = getattr(source, "kind", None)
    return kind in SOURCES and SOURCES.get(kind).dali


def unavailable_reason(cfg, source, device, auto: bool = False) -> str | None:
    """None when DALI can serve this data, else why not. With `auto`, also None only where DALI is
    the faster choice: on a CUDA device (GPU decode)."""
    if not _reads(source):
        kind = getattr(source, "kind", "?")
        what = SOURCES.get(kind).summary if kind in SOURCES else kind
        return (f"DALI reads {dali_readable()} only; this data is {what}; pack images into shards with "
                "`python -m mcf_fast.data.prepare` or use data.loader=torch")
    if auto and not _on_cuda(device):
        return ("the training device is the CPU, where DALI's CPU pipeline costs 2.2 ms per 224-px image "
                "against the torch loader's 1.0 (dev/notes/data-path.md); data.loader=dali forces it")
    try:
        _dali()
    except ImportError as e:
        return f"nvidia-dali is not installed ({e}); pip install nvidia-dali-cuda130"
    if not getattr(source, "all_validated", False):
        bad = [s for s, v in zip(getattr(source, "shards", []), getattr(source, "validated", [])) if not v][:3]
        return (f"shards are not validated (e.g. {bad}); one undecodable JPEG kills a DALI batch, so run "
                "`python -m mcf_fast.data.scan --write-index SHARDS` (or build them with prepare)")
    return None


def choose_backend(cfg, source, device) -> tuple[str, str | None]:
    """(backend, a note for the log) for data.loader auto or dali; a forced dali that cannot run raises.
    `auto` speaks only where the note can help: a CUDA device reading a kind DALI reads. On a CPU, or
    for synthetic faces, the torch loader is the right choice and nothing is said."""
    why = unavailable_reason(cfg, source, device, auto=cfg.loader == "auto")
    if why is None:
        return "dali", None
    if cfg.loader == "dali":
        raise ValueError(f"data.loader=dali cannot run: {why}")
    return "torch", why if _on_cuda(device) and _reads(source) else None


class DaliBackend:
    """Runs the pipeline for one rank; `iterate(epoch, step)` yields batch dicts like BatchMaker."""

    def __init__(self, cfg, source, *, batch_size, rank, world_size, seed, device, drop_last):
        import torch
        self.cfg, self.source, self.batch_size, self.seed = cfg, source, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.order = sampling.EpochOrder(source.counts, seed, cfg.shuffle_window)
        self.per_rank, self.steps_per_epoch = sampling.per_rank(source.num_samples, batch_size, world_size,
                                                                 drop_last)
        self.device = torch.device(device)
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self._pipe = None

    def _feed(self, epoch, step):
        """external_source callback state: yields (jpegs, flips, ids, crop anchors, crop shapes)."""
        cfg = self.cfg
        e, s = epoch, step
        while True:
            start = sampling.step_start(s, self.batch_size, self.rank, self.world_size)
            ids = self.order.ids(e, start, start + self.batch_size)
            data = [np.frombuffer(self.source.read(int(i))[0], np.uint8) for i in ids]
            flips = (sampling.flip_flags(self.seed, e, ids) & cfg.hflip).astype(np.int32)
            meta = [np.array([i, e, s], np.int64) for i in ids]
            if cfg.random_resized_crop:
                hw = np.array([_jpeg_hw(d) for d in data])
                boxes = sampling.rrc_boxes(self.seed, e, ids, hw[:, 0], hw[:, 1], cfg.rrc_scale, cfg.rrc_ratio)
                anchors = [b[[0, 1]].astype(np.float32) for b in boxes]   # (x, y)
                shapes = [b[[2, 3]].astype(np.float32) for b in boxes]    # (w, h)
                yield (data, list(flips), meta, anchors, shapes)
            else:
                yield (data, list(flips), meta)
            s += 1
            if s == self.steps_per_epoch:
                e, s = e + 1, 0

    def build(self, epoch, step):
        dali = _dali()
        from nvidia.dali import fn, types
        cfg, S = self.cfg, self.cfg.img_size
        gen = self._feed(epoch, step)
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.workers),
                             device_id=self.device_id, prefetch_queue_depth=cfg.prefetch)
        with pipe:
            rrc = cfg.random_resized_crop
            outs = fn.external_source(source=gen, num_outputs=5 if rrc else 3, batch=True, cycle=False,
                                      dtype=[types.UINT8, types.INT32, types.INT64, types.FLOAT, types.FLOAT][:5 if rrc else 3])
            jpegs, flips, meta = outs[:3]
            dev = "mixed" if self.device_id is not None else "cpu"
            if cfg.random_resized_crop:
                imgs = fn.decoders.image_slice(jpegs, outs[3], outs[4], device=dev, output_type=types.RGB,
                                               normalized_anchor=False, normalized_shape=False, axis_names="WH")
                imgs = fn.resize(imgs, size=[S, S], antialias=True)
            else:
                imgs = fn.decoders.image(jpegs, device=dev, output_type=types.RGB)
                imgs = fn.resize(imgs, resize_shorter=S, antialias=True)
            out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
            imgs = fn.crop_mirror_normalize(
                imgs, crop=(S, S), crop_pos_x=0.5, crop_pos_y=0.5, mirror=flips, dtype=out_dtype,
                output_layout="CHW", mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std])
            pipe.set_outputs(imgs, meta)
        pipe.build()
        return pipe

    def iterate(self, epoch, step):
        import torch
        pipe = self.build(epoch, step)
        self._pipe = pipe
        while True:
            try:
                imgs, meta = pipe.run()
            except RuntimeError as e:
                raise RuntimeError(
                    f"DALI failed on a batch of validated shards ({str(e).splitlines()[0][:300]}); a shard "
                    "changed after validation? rerun `python -m mcf_fast.data.scan --write-index`") from e
            meta = np.stack([np.asarray(m) for m in (meta.as_cpu() if hasattr(meta, "as_cpu") else meta)])
            if self.device_id is None:
                # copy: DALI recycles its output buffers on the next run()
                x = torch.from_numpy(np.array(imgs.as_tensor(), copy=True))
            else:
                from nvidia.dali.plugin.pytorch import feed_ndarray
                t = imgs.as_tensor()
                x = torch.empty(t.shape(), dtype=torch.float16 if self.cfg.dtype == "float16" else torch.float32,
                                device=self.device)
                feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
            yield {"images": x, "ids": torch.from_numpy(meta[:, 0].copy()), "skipped": {}, "converted": {},
                   "epoch": int(meta[0, 1]), "step": int(meta[0, 2])}

    def close(self):
        self._pipe = None


def _jpeg_hw(data: np.ndarray) -> tuple[int, int]:
    """(height, width) from the image header only (any format pillow knows)."""
    import io

    from PIL import Image
    w, h = Image.open(io.BytesIO(data.tobytes())).size
    return h, w


def webdataset_reader_pipeline(shards, batch_size, size, *, num_threads=2, device_id=None, seed=0):
    """DALI's native path (fn.readers.webdataset + index files): for throughput comparisons."""
    dali = _dali()
    from nvidia.dali import fn, types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    with pipe:
        jpegs = fn.readers.webdataset(paths=list(shards), index_paths=[s + ".idx" for s in shards],
                                      ext=["jpg"], random_shuffle=True, initial_fill=256,
                                      missing_component_behavior="skip", name="reader")
        imgs = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu",
                                 output_type=types.RGB)
        imgs = fn.resize(imgs, resize_shorter=size, antialias=True)
        imgs = fn.crop_mirror_normalize(imgs, crop=(size, size), mirror=fn.random.coin_flip(),
                                        dtype=types.FLOAT, output_layout="CHW",
                                        mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                                        std=[0.229 * 255, 0.224 * 255, 0.225 * 255])
        pipe.set_outputs(imgs)
    pipe.build()
    return pipe
