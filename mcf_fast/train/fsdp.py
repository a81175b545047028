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

Every parameter is sharded on dim 0 over the same 1-D mesh, so the target encoder's local shard of a
tensor covers exactly the rows of the online encoder's local shard of the same tensor: the EMA update
(`torch._foreach_mul_/_add_` on the sharded DTensors) is pointwise on local shards, with no
communication (tests/test_dist_fsdp.py counts the collectives).

Single-process runs never call `shard_model`; `full_encoder` then returns the encoder itself.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .runtime import Runtime

log = logging.getLogger(__name__)
VIT_METHODS = ("forward_visible", "forward_intermediates")  # how MCFModel calls a VisionTransformer


def _teacher(model) -> nn.Module | None:
    perceptual = getattr(model, "perceptual", None)
    return getattr(perceptual, "teacher", None) if perceptual is not None else None


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

    def unit(module: nn.Module, **kw) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=kw.pop("reshard", reshard), **kw)

    def vit_units(vit: nn.Module, **kw) -> None:
        for blk in vit.blocks:
            unit(blk, **kw)
        unit(vit, **kw)
        for method in VIT_METHODS:  # the model calls these, not forward: hook them too
            register_fsdp_forward_method(vit, method)

    for vit in (model.encoder, model.target_encoder):
        vit_units(vit)
    for blk in model.decoder_blocks:
        unit(blk)
    for head in (model.projector, model.predictor, model.target_projector):
        unit(head)

    teacher = _teacher(model)
    ignored: set[nn.Parameter] = set()
    if teacher is not None:
        if cfg.dist.teacher_sharding == "shard":
            # The teacher runs twice per step (real image without graph, prediction with graph) and
            # once more in backward for the input gradient: free its units after each use.
            vit_units(teacher, reshard=True)
        else:
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


__all__ = ["shard_model", "full_encoder", "mixed_precision", "local_numel_bytes"]
