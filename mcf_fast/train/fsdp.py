"""FSDP2 wrapping of the MCF model, and gathering of full weights for export.

Layout of the sharding units (each `fully_shard` call is one all-gather / reduce-scatter unit):
  - every ViT the model runs, the same way: each block, then the ViT itself (its stem: patch
    embedding, CLS, position table, final norm). That is the online encoder, the target encoder and,
    when `dist.teacher_sharding == "shard"`, the frozen teacher. The model calls a ViT through its own
    methods (`forward_visible` for the encoders on the visible patches, `forward_intermediates` for a
    teacher, the 'ema' teacher being the target encoder), registered as FSDP forward methods so the
    unit is gathered around each call, as its `forward` would be;
  - the projector, predictor and target projector (MoCo v3 MLPs);
  - the root (MCFModel), which owns what is left: the decoder's embed / mask token / position table /
    norm / pixel head, gathered by the root's pre-hook on `MCFModel.forward` and on
    `MCFModel.reconstruct` (the pictures, which every rank runs together).
`unit_layout(model, teacher_sharding)` states this layout as data; `shard_model` applies it, and the
cost sheet (mcf_fast/plan/memory.py) reads it to model the shards without a process group.

Every parameter is sharded on dim 0 over the same 1-D mesh, so the target encoder's local shard of a
tensor covers exactly the rows of the online encoder's local shard of the same tensor: the EMA update
(`torch._foreach_mul_/_add_` on the sharded DTensors) is pointwise on local shards, with no
communication (tests/test_dist_fsdp.py counts the collectives).

Single-process runs never call `shard_model`; `full_encoder` then returns the encoder itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from .runtime import Runtime

log = logging.getLogger(__name__)
VIT_METHODS = ("forward_visible", "forward_intermediates")  # how MCFModel calls a VisionTransformer


def _teacher(model) -> nn.Module | None:
    perceptual = getattr(model, "perceptual", None)
    return getattr(perceptual, "teacher", None) if perceptual is not None else None


@dataclass(frozen=True)
class UnitLayout:
    """The FSDP2 units `shard_model` makes, as data (the cost sheet reads it to model the shards).

    `units`: module paths in the order `fully_shard` is applied (each block before its ViT, the root
    '' last); `vits`: the unit paths that are ViTs (their forward methods are registered); `teacher`: the
    frozen teacher's path (None without one); `teacher_replicated`: its parameters are kept out of
    every unit (whole on each rank)."""
    units: tuple
    vits: tuple
    teacher: str | None
    teacher_replicated: bool

    def unit_of(self, name: str) -> str | None:
        """The unit holding parameter `name` (the innermost unit path it lies under; '' = the root);
        None for a replicated teacher's parameter, which no unit manages."""
        if self.teacher_replicated and _under(name, self.teacher):
            return None
        return max((u for u in self.units if u and _under(name, u)), key=len, default="")

    def is_teacher(self, unit: str) -> bool:
        return _under(unit, self.teacher) or unit == self.teacher


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and name.startswith(prefix + ".")


def unit_layout(model, teacher_sharding: str) -> UnitLayout:
    """The layout `shard_model(model, cfg)` makes for `cfg.dist.teacher_sharding` (module docstring).
    Reads only the model's structure: a model on the meta device or with fake tensors works."""
    paths = {id(m): n for n, m in model.named_modules()}
    units: list[str] = []
    vits: list[str] = []

    def vit_units(vit: nn.Module) -> None:
        units.extend(paths[id(blk)] for blk in vit.blocks)
        units.append(paths[id(vit)])
        vits.append(paths[id(vit)])

    for vit in (model.encoder, model.target_encoder):
        vit_units(vit)
    units.extend(paths[id(blk)] for blk in model.decoder_blocks)
    units.extend(paths[id(head)] for head in (model.projector, model.predictor, model.target_projector))
    teacher = _teacher(model)
    if teacher is not None and teacher_sharding == "shard":
        vit_units(teacher)
    units.append("")  # the root: what no unit above holds
    return UnitLayout(tuple(units), tuple(vits), paths[id(teacher)] if teacher is not None else None,
                      teacher is not None and teacher_sharding != "shard")


def mixed_precision(precision: str):
    """bf16 parameters and compute with fp32 gradient reduction for bf16 runs; fp16 runs keep fp32
    parameters (autocast + GradScaler do the casting); fp32 runs change nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model, cfg, rt: Runtime):
    """Apply FSDP2 `fully_shard` to `model` in place (layout in the module docstring); returns it.

    Call after the model is on its device and before building the optimizer (the optimizer must see
    the sharded parameters). The frozen teacher is replicated (kept out of every unit through
    `ignored_params`) or sharded as its own units, per `cfg.dist.teacher_sharding`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not rt.distributed:
        raise ValueError("shard_model needs a process group with world size > 1 (launch with torchrun)")
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    mp = mixed_precision(rt.precision)
    reshard = bool(cfg.dist.reshard_after_forward)

    layout = unit_layout(model, cfg.dist.teacher_sharding)
    for path in layout.units[:-1]:  # the root last, below
        module = model.get_submodule(path)
        # A sharded teacher runs twice per step (real image without graph, prediction with graph) and
        # once more in backward for the input gradient: free its units after each use.
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard or layout.is_teacher(path))
        if path in layout.vits:
            for method in VIT_METHODS:  # the model calls these, not forward: hook them too
                register_fsdp_forward_method(module, method)

    teacher = _teacher(model)
    ignored: set[nn.Parameter] = set()
    if teacher is not None and layout.teacher_replicated:
        ignored = set(teacher.parameters())
        if mp.param_dtype is not None:
            # Frozen: no fp32 master copy is needed. Stored in the compute dtype it takes half the
            # memory and gets inputs of that dtype, as the sharded units' all-gathered weights do.
            teacher.to(mp.param_dtype)
    # The root keeps its parameters gathered from forward to the end of backward (FSDP2's default
    # for the root): they are read again by backward immediately anyway.
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    register_fsdp_forward_method(model, "reconstruct")  # the pictures: every rank runs it together
    if rt.is_main:
        n_units = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
        log.info("FSDP2: %d units over %d ranks, reshard_after_forward=%s, params %s, teacher %s",
                 n_units, rt.world_size, reshard, mp.param_dtype or "fp32",
                 cfg.dist.teacher_sharding if teacher is not None else getattr(model, "teacher_kind", "none"))
    return model


def local_numel_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts only its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def full_encoder(model, rt: Runtime) -> nn.Module | None:
    """The online encoder with full weights: a plain `VisionTransformer` on rank 0, None elsewhere.

    All ranks must call it (it gathers). Single-process: the encoder module itself.
    """
    if not rt.distributed:
        return model.encoder
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mcf_fast.model.checkpoints import check_fit
    from mcf_fast.model.vit import build_vit

    # full_state_dict + cpu_offload: gathered tensor by tensor, kept on rank 0's CPU only, so no rank
    # ever holds the whole model on the device.
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.is_main:
        return None
    enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    enc = build_vit(model.encoder.arch, model.encoder.attention)
    check_fit(enc.state_dict(), enc_sd, "the gathered encoder")
    enc.load_state_dict(enc_sd)
    return enc


__all__ = ["shard_model", "unit_layout", "UnitLayout", "full_encoder", "mixed_precision", "local_numel_bytes"]
