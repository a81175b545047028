"""Run the real training step (`mcf_fast.train.step.TrainStep`) on fake tensors: no weights, no compute.

The model is built on the meta device by the same builder the training loop uses, its parameters are
turned into fake CPU tensors, and one optimizer step of `TrainStep` on one micro-batch runs under
`StepTracer` (with accumulation, the earlier micro-batches' gradients are live from its start). The optimizer
state exists before the traced step (a warm-up update creates it), as it does in every step but the
first. What the trace does not see: values (the masks, which read the sample ids, are drawn for real),
CUDA-only kernels (the CPU dispatch is traced; their saved tensors are the same size), and FSDP2
(`memory.py` adds its shards and buffers).
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from .tracer import StepTracer

PARTS = ("encoder", "decoder", "teacher on the reconstruction", "teacher on the original", "target", "heads",
         "other")


@dataclass
class Tensor:
    """One parameter, buffer or optimizer-state tensor of the model as the run holds it."""
    name: str
    numel: int
    dim0: int
    bytes: int
    kind: str  # 'trainable', 'frozen' (target encoder / projector, position tables), 'teacher', 'buffer', 'optim'


@dataclass
class StepTrace:
    """What one traced optimizer step did (bytes are per process, single-process layout)."""
    batch: int
    micro_steps: int  # micro-batches traced (1)
    precision: str
    flops: int  # the traced micro-batch's, by FlopCounterMode's formulas
    flops_by_part: dict
    flops_by_op: dict
    peak: dict  # running maxima of transient bytes: 'all', 'act+cast', 'act'
    at_peak: dict  # per view of `peak`: the category split, bytes by part, part and phase at that moment
    tensors: list = field(default_factory=list)  # Tensor rows: parameters, buffers, optimizer state
    missing_parts: list = field(default_factory=list)  # model methods the part labels could not wrap
    seconds: float | None = None  # how long the trace took (set by the caller)
    notes: list = field(default_factory=list)  # what the trace assumed in place of missing files
    accumulating: bool = False  # earlier micro-batches' gradients were live during the traced one
    layouts: dict = field(default_factory=dict)  # teacher_sharding -> train/fsdp.py's UnitLayout of this model

    @property
    def flops_per_image(self) -> float:
        return self.flops / (self.batch * self.micro_steps)

    def bytes_of(self, *kinds: str) -> int:
        return sum(t.bytes for t in self.tensors if t.kind in kinds)


def build(m, seed: int):
    """The model exactly as the training loop builds it (the one place that names the builder)."""
    from mcf_fast.model.mcf import MCFModel
    return MCFModel.from_config(m, seed=seed)


def traceable(cfg, notes: list | None = None):
    """A copy of `cfg` whose step costs the same but needs no files: weights that would be loaded
    (teacher checkpoint, decoder_init, init) are left random, a checkpoint teacher keeps its
    architecture (read off the file; the --model.teacher_* fields when the file is not on this
    machine, said in `notes`), compile is off (the trace is of the eager step)."""
    cfg = copy.deepcopy(cfg)
    m = cfg.model
    if m.teacher.startswith("checkpoint:"):
        spec = m.teacher.partition(":")[2]
        m.teacher = "random"
        path = spec.rpartition("#")[0] if "#" in spec and not os.path.exists(spec) else spec
        if not os.path.isfile(path):
            if notes is not None:
                notes.append(f"teacher checkpoint {path} is not on this machine: planned with the --model.teacher_* "
                             f"architecture ({m.teacher_embed_dim}-d, {m.teacher_depth} blocks, patch "
                             f"{m.teacher_patch_size} at {m.teacher_img_size} px)")
            arch = dict(img_size=m.teacher_img_size, patch_size=m.teacher_patch_size, embed_dim=m.teacher_embed_dim,
                        depth=m.teacher_depth, num_heads=m.teacher_num_heads)
        else:
            arch = checkpoint_teacher_arch(spec, m.teacher_num_heads)
        m.teacher_img_size, m.teacher_patch_size = arch["img_size"], arch["patch_size"]
        m.teacher_embed_dim, m.teacher_depth, m.teacher_num_heads = (arch["embed_dim"], arch["depth"],
                                                                     arch["num_heads"])
    m.decoder_init, m.init, m.compile, m.attention = "", "", False, "sdpa"
    return cfg


@functools.lru_cache(maxsize=8)
def checkpoint_teacher_arch(spec: str, num_heads: int) -> dict:
    """The architecture of a checkpoint teacher (FILE or FILE#PART) read off its tensor shapes, the part
    chosen as `build_teacher_vit` chooses it; nothing is built."""
    from mcf_fast.model.checkpoints import infer_vit_arch
    from mcf_fast.model.layouts import open_checkpoint, split_spec
    path, part = split_spec(spec)
    ck = open_checkpoint(path)
    part = part or next((p for p in ("teacher", "online_encoder") if p in ck.parts), "online_encoder")
    return infer_vit_arch(dict(ck.part(part)), num_heads)


def _fake_model(cfg, mode: FakeTensorMode):
    """Build on the meta device (no memory, no init cost), then give every tensor a fake CPU twin."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build(cfg.model, cfg.run.seed)
    dev = torch.device("cpu")
    conv = mode.fake_tensor_converter
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = torch.nn.Parameter(conv.from_meta_and_device(mode, p.data, dev),
                                                        requires_grad=p.requires_grad)
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = conv.from_meta_and_device(mode, b, dev)
    return model.train()


def _wrap_parts(model, tracer: StepTracer) -> list[str]:
    """Label the model's forward by part (see PARTS); returns the hooks that could not be placed."""
    missing = []

    def wrap(obj, attr, part_of):
        fn = getattr(obj, attr, None) if obj is not None else None
        if fn is None:
            missing.append(attr)
            return
        setattr(obj, attr, lambda *a, **k: tracer.run_part(part_of(*a), fn, *a, **k))

    wrap(model, "encode", lambda vit, *a: "target" if vit is model.target_encoder else "encoder")
    wrap(model, "decode", lambda *a: "decoder")
    if getattr(model, "perceptual", None) is not None:
        wrap(model.perceptual, "features", lambda *a: "teacher on the reconstruction" if torch.is_grad_enabled()
             else "teacher on the original")
    for name, part in (("projector", "heads"), ("predictor", "heads"), ("target_projector", "target")):
        wrap(getattr(model, name, None), "forward", lambda *a, part=part: part)
    return missing


def _inventory(model, optimizer) -> list[Tensor]:
    """Every parameter, buffer and optimizer-state tensor with its size and kind."""
    vit = getattr(getattr(model, "perceptual", None), "teacher", None)  # None for the ema and pixel teachers
    teacher = {id(p) for p in (vit.parameters() if vit is not None else ())}
    rows = []
    for name, p in model.named_parameters():
        kind = "teacher" if id(p) in teacher else "trainable" if p.requires_grad else "frozen"
        rows.append(Tensor(name, p.numel(), p.shape[0] if p.dim() else 1, p.numel() * p.element_size(), kind))
    for name, b in model.named_buffers():
        rows.append(Tensor(name, b.numel(), b.shape[0] if b.dim() else 1, b.numel() * b.element_size(), "buffer"))
    for i, st in enumerate(optimizer.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                rows.append(Tensor(f"optim.{i}.{k}", v.numel(), v.shape[0] if v.dim() else 1,
                                   v.numel() * v.element_size(), "optim"))
    return rows


class _Batches:
    """Fresh fake images per micro-batch, created inside the trace (the loader's output counts); real
    sample ids, because the mask generator reads them."""

    def __init__(self, batch: int, size: int, dtype: torch.dtype, ids: torch.Tensor):
        self.batch, self.size, self.dtype, self.ids, self.i = batch, size, dtype, ids, 0

    def __iter__(self):
        return self

    def __next__(self):
        from types import SimpleNamespace
        imgs = torch.empty(self.batch, 3, self.size, self.size, dtype=self.dtype)
        with unset_fake_temporarily():  # real values: the mask generator reads them
            ids = self.ids + self.i * self.batch
        self.i += 1
        return SimpleNamespace(images=imgs, sample_ids=ids)


def trace_step(cfg, precision: str) -> StepTrace:
    """Trace one optimizer step of `cfg` (a validated Config) at `precision` (bf16 | fp16 | fp32).

    One micro-batch is traced. With accumulation, the gradients of the earlier micro-batches are live
    before it (made inside the trace, so they count), as in every micro-batch but the first."""
    from torch.utils.flop_counter import FlopCounterMode

    from mcf_fast.train.fsdp import unit_layout
    from mcf_fast.train.optim import build_optimizer
    from mcf_fast.train.runtime import Runtime
    from mcf_fast.train.step import TrainStep

    notes: list[str] = []
    cfg = traceable(cfg, notes)
    o, B = cfg.optim, cfg.optim.batch_size
    accumulating = o.accum_steps > 1
    o.accum_steps = 1
    ids = torch.arange(B, dtype=torch.int64)  # real: made before the fake mode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(cfg, mode)
    layouts = {s: unit_layout(model, s) for s in ("replicate", "shard")}
    dev = torch.device("cpu")
    registry = FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()).flop_registry
    with mode:
        optimizer = build_optimizer(model, 1e-4, o.weight_decay, (o.beta1, o.beta2), dev, o.decay_tokens)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # the optimizer state of a step after the first
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = TrainStep(model, optimizer, cfg, Runtime(dev, precision, 0, 1, 0))
        step.masks = _drawn_for_real(step.masks)
        persistent = (list(model.parameters()) + list(model.buffers()) + [step._zero]
                      + [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
        tracer = StepTracer(persistent, model.parameters(), registry)
        missing = _wrap_parts(model, tracer)
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracer.mark_grad(p.grad)) for p in params]
        batches = _Batches(B, cfg.model.img_size, getattr(torch, cfg.data.dtype), ids)
        with tracer:
            if accumulating:
                for p in params:
                    p.grad = torch.zeros_like(p)
                    tracer.mark_grad(p.grad)
            step(batches, 0, 1e-4, o.momentum, mark=_Phases(tracer))
        for h in hooks:
            h.remove()
        rows = _inventory(model, optimizer)
    parts = {p: int(tracer.flops.get(p, 0)) for p in PARTS}
    return StepTrace(B, 1, precision, sum(parts.values()), parts, dict(tracer.flops_by_op), dict(tracer.peak),
                     dict(tracer.at_peak), rows, missing, notes=notes, accumulating=accumulating, layouts=layouts)


def _drawn_for_real(generator):
    """The step's mask generator run outside the fake mode: it reads the sample ids' values, whichever
    backend draws them (the compiled op or the torch ops); the tracer still counts the masks' bytes."""
    def draw(*args, **kwargs):
        with unset_fake_temporarily():
            return generator(*args, **kwargs)
    return draw


class _Phases:
    """TrainStep's `mark` hook names the phase that just ended; the tracer wants the one that starts."""
    NEXT = {"data": "ema", "ema": "forward", "forward": "backward", "backward": "optimizer", "optimizer": "done"}

    def __init__(self, tracer: StepTracer):
        self.tracer = tracer

    def __call__(self, ended: str) -> None:
        self.tracer.phase = self.NEXT.get(ended, ended)


def sdpa_cpu_flops() -> dict:
    """FlopCounterMode counts CUDA's attention kernels but not the CPU flash kernel the fake step
    dispatches to: torch's own SDPA formulas for it. The one statement of this mapping: the benchmarks'
    `count_flops` (benchmarks/flops.py) uses it too, so the sheet and the step suite count alike."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(g, q, k, v)}


__all__ = ["trace_step", "StepTrace", "Tensor", "PARTS", "traceable", "build"]
