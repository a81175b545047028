"""Will a downstream run fit in memory? Estimated before any work, refused with the fix when it will not.

FaRL's setting (448 px, batch 40) needs tens of GB for one training step of a ViT-B; on a laptop it is
killed for memory minutes in, with no message. The estimate traces one real training step (the task's
own loss, forward and backward) on the `meta` device, where tensors have shapes but no storage, with a
dispatch mode that adds every storage created and subtracts it when it is freed: the peak of that count
is the step's activation (and gradient) memory, at no compute cost. Traced at batch 2 and 3 (batch norm
needs two samples), it is linear in the batch. Added to it, 4 bytes per parameter each: the weights,
AdamW's two moments and the two temporaries of its foreach update, the EMA copy and the copy held while
the EMA is scored; then the process as it is now and the loader workers.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcf_fast.procmem import rss_bytes

log = logging.getLogger(__name__)

GB = 1e9
# A forked loader worker: its own Python objects, decode buffers and the batches it has prefetched
# (DataLoader's prefetch_factor 2). 150 MB covers the interpreter pages a worker dirties.
WORKER_BYTES, PREFETCH = 150e6, 2
# Memory the run takes after the check that neither the trace nor the weights cover: modules imported
# later (scipy, PIL, tqdm), decoded test images, the scoring pass, allocator caches: 0.2-0.3 GB measured on a
# 32 px toy run alone, where nothing else is large, and up to 0.41 GB for the same run on a busy machine
# (glibc keeps more freed pages resident); 0.6 GB keeps the estimate an upper bound in both.
SLACK = 0.6e9
# Refuse above this share of the budget: allocator fragmentation and what the trace does not see.
HEADROOM = 0.9
CPU_BATCHES = (8, 4, 2)  # what a CPU run may pick when no --batch-size was given, largest first


class MemoryBudgetError(ValueError):
    """The run would not fit: the message names the estimate, the budget and the fix."""


class _LiveBytes(TorchDispatchMode):
    """Sum of the bytes of live storages created under it; `peak` is the largest that sum reached."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._sizes:
            return
        self._sizes[key] = st.nbytes()
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _meta_model(cfg, arch: dict, out_channels: int):
    from mcf_fast.model.vit import VisionTransformer

    from .heads import dense_model
    with torch.device("meta"):
        enc = VisionTransformer(**{**arch, "img_size": cfg.img_size or arch["img_size"]})
        return dense_model(enc, out_channels, protocol=cfg.protocol, head_width=cfg.head_width,
                           head_init=cfg.head_init, freeze_backbone=cfg.freeze_backbone, seed=cfg.seed)


_TRACED: dict[tuple, tuple[int, int]] = {}  # one trace per model and batch per process (the first costs ~3 s)


def step_bytes(cfg, arch: dict, task_cls, batch: int) -> tuple[int, int]:
    """(peak bytes of one training step's activations and gradients, parameter count), traced on meta."""
    key = (tuple(sorted(arch.items())), task_cls.name, batch, cfg.protocol, cfg.img_size, cfg.head_width,
           cfg.head_init, cfg.freeze_backbone, cfg.heatmap_weight)
    if key not in _TRACED:
        _TRACED[key] = _trace(cfg, arch, task_cls, batch)
    return _TRACED[key]


def _trace(cfg, arch: dict, task_cls, batch: int) -> tuple[int, int]:
    size = cfg.img_size or arch["img_size"]
    with torch.random.fork_rng(devices=[]):  # building the head reseeds: the run's RNG must not notice
        model = _meta_model(cfg, arch, task_cls.out_channels)
    model.train()
    task = task_cls(cfg, size, [0.0] * 3, [1.0] * 3)
    meta = torch.device("meta")
    batch_in = {"image": torch.empty(batch, 3, size, size, device=meta),
                "points": torch.empty(batch, 19, 2, device=meta),
                "label": torch.empty(batch, size, size, dtype=torch.long, device=meta)}
    mode = _LiveBytes()
    with mode:
        loss, _ = task.loss(model, batch_in, meta)
        loss.backward()
    return mode.peak, sum(p.numel() for p in model.parameters())


def available_bytes() -> int | None:
    """Memory the system can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


@dataclass
class Estimate:
    """Bytes of a run at `batch` and how they grow with the batch."""
    task: str
    size: int
    batch: int
    act_two: float       # activations + gradients of one training step at batch 2
    per_image: float     # ... and per further image
    weights: float       # weights, AdamW moments, EMA and the copy held while the EMA is scored
    process: float       # the process before the run (interpreter, torch, data already read)
    workers: int         # loader worker processes (training + scoring loaders)
    image_bytes: float   # one training sample as a loader holds it
    on_gpu: bool = False  # the budget is a GPU's: only activations, weights and workspace count against it

    def activations(self, batch: int | None = None) -> float:
        return self.act_two + self.per_image * ((batch or self.batch) - 2)

    def loaders(self, batch: int | None = None) -> float:
        return self.workers * (WORKER_BYTES + PREFETCH * (batch or self.batch) * self.image_bytes)

    def at_batch(self, batch: int) -> float:
        if self.on_gpu:
            return self.activations(batch) + self.weights + SLACK
        return self.activations(batch) + self.weights + self.process + SLACK + self.loaders(batch)

    @property
    def total(self) -> float:
        return self.at_batch(self.batch)

    def text(self) -> str:
        return (f"{self.task} at {self.size} px, batch {self.batch}: about {self.total / GB:.1f} GB "
                f"({self.activations() / GB:.1f} activations and gradients, {self.weights / GB:.1f} weights, "
                f"optimizer and EMA, {(self.process + SLACK + self.loaders()) / GB:.1f} process and loaders)")


def estimate(cfg, arch: dict, task_cls) -> Estimate:
    """The peak memory of `cfg`'s run (see the module docstring)."""
    two, params = step_bytes(cfg, arch, task_cls, 2)
    three, _ = step_bytes(cfg, arch, task_cls, 3)
    # weights, AdamW's 2 moments and the 2 temporaries its foreach step allocates (+ EMA, + the scored copy)
    copies = 5 + (2 if cfg.ema_decay > 0 else 0)
    size = cfg.img_size or arch["img_size"]
    image = 3 * size * size * 4 + (size * size * 8 if task_cls.name == "parsing" else 0)
    return Estimate(task_cls.name, size, cfg.batch_size, float(two), float(max(0, three - two)),
                    float(params * 4 * copies), float(rss_bytes()), 2 * cfg.workers, float(image),
                    on_gpu=_gpu(cfg.device) is not None)


def _gpu(device: str) -> torch.device | None:
    """The CUDA device a run will use, or None for a CPU run."""
    if device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.device("cuda" if device == "auto" else device)


def budget(cfg) -> tuple[float | None, str]:
    """(bytes the run may use, where that number comes from); None: no check. On a GPU run the budget is
    the device's free memory (host memory is rarely what stops it)."""
    if cfg.memory_budget_gb < 0:
        return None, "check off"
    if cfg.memory_budget_gb > 0:
        return cfg.memory_budget_gb * GB, "the --memory-budget-gb"
    gpu = _gpu(cfg.device)
    if gpu is not None:
        return float(torch.cuda.mem_get_info(gpu)[0]), f"free on {gpu}"
    avail = available_bytes()
    if avail is None:
        return None, "available memory unknown"
    return float(avail + rss_bytes()), "available"


def fitting_batch(e: Estimate, limit: float, low: int = 1, high: int = 4096) -> int:
    """The largest batch in [low, high] whose estimate stays under `limit` (0 when even `low` does not)."""
    if e.at_batch(low) > limit:
        return 0
    b = low
    while b < high and e.at_batch(b + 1) <= limit:
        b += 1
    return b


def check_memory(cfg, arch: dict, task_cls) -> Estimate:
    """Estimate `cfg`'s run; raise MemoryBudgetError naming the fix when it exceeds the budget."""
    e = estimate(cfg, arch, task_cls)
    limit, source = budget(cfg)
    log.info("memory estimate: %s; budget: %s", e.text(), f"{limit / GB:.1f} GB ({source})" if limit else source)
    if limit is None or e.total <= HEADROOM * limit:
        return e
    fit = fitting_batch(e, HEADROOM * limit, 2 if cfg.protocol == "farl" else 1)
    p = arch["patch_size"]
    fix = (f"use --batch-size {fit} (about {e.at_batch(fit) / GB:.1f} GB)" if fit
           else f"use a smaller --img-size (e.g. {max(p, e.size // 2 // p * p)})")
    raise MemoryBudgetError(f"{e.text()}, but {limit / GB:.1f} GB is {source}: {fix}; "
                            "--memory-budget-gb -1 skips this check")


def cpu_batch(cfg, arch: dict, task_cls) -> int:
    """For a CPU run with no --batch-size: the largest of CPU_BATCHES that fits the budget (the smallest
    when none does, so the check that follows names the fix)."""
    limit, _ = budget(cfg)
    e = estimate(dataclasses.replace(cfg, batch_size=CPU_BATCHES[-1]), arch, task_cls)
    for b in CPU_BATCHES:
        if limit is None or e.at_batch(b) <= HEADROOM * limit:
            return b
    return CPU_BATCHES[-1]
