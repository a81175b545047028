"""Masked-token gather (encoder input) and scatter (decoder un-shuffle), fused with the position add.

Layers: references (`*_ref`, MAE's formulation, the spec) -> torch.library ops (`mcf_fast::*`, see backend.OPS_NS,
dispatching to the Triton kernels in _gs_triton.py or the torch formulation in _gs_cpu.py) ->
autograd.Functions -> the public `gather_visible` / `scatter_to_full`.

Output dtype: exactly what the reference's plain PyTorch produces, i.e. the type promotion of all
floating inputs (x bf16 under autocast with an fp32 pos gives fp32, as MAE's `x + pos_embed` does).
Pass a pos in x's dtype to keep the output in x's dtype. Gradients come back in each input's dtype;
d(pos), d(cls) and d(mask_token) are accumulated in fp32 before that cast.
Index tensors must hold distinct indices per row (true of masks): with duplicates the gradient to x
of the fast paths is undefined (the reference would sum them).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _gs_cpu
from .backend import OPS_NS, resolve

_OPS = getattr(torch.ops, OPS_NS)  # this copy's ops (see backend.OPS_NS)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# references: MAE's formulation in plain PyTorch (add pos to all L, gather with an expanded index)
def gather_visible_ref(x, ids_keep, pos=None, cls=None):
    """Reference for gather_visible: `x + pos`, then gather with ids_keep expanded to [N, K, D]."""
    N, L, D = x.shape
    off = 0 if pos is None else pos.shape[0] - L
    if pos is not None:
        x = x + pos[off:].unsqueeze(0)
    out = torch.gather(x, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, D))
    if cls is not None:
        c = cls.reshape(1, 1, D)
        if pos is not None and off == 1:
            c = c + pos[:1].unsqueeze(0)
        out = torch.cat([c.expand(N, -1, -1), out], dim=1)
    return out


def scatter_to_full_ref(tokens, ids_restore, mask_token, pos=None):
    """Reference for scatter_to_full: append mask tokens, gather to original order, re-add CLS, add pos."""
    N, T, Dd = tokens.shape
    L = ids_restore.shape[1]
    body = torch.cat([tokens[:, 1:], mask_token.reshape(1, 1, Dd).expand(N, L + 1 - T, Dd)], dim=1)
    body = torch.gather(body, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, Dd))
    out = torch.cat([tokens[:, :1], body], dim=1)
    if pos is not None:
        out = out + pos.unsqueeze(0)
    return out


# ----------------------------------------------------------------------------------------------
# input checks (shapes, dtypes, devices only: nothing that would read device memory)
def _fail(op, msg):
    raise ValueError(f"{op}: {msg}")


def _check_common(op, t, name, ndim, desc):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor {desc}, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(op, f"{name} must be {desc}, got shape {tuple(t.shape)}")


def _check_float(op, t, name):
    if t.dtype not in _FLOATS:
        _fail(op, f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check_index(op, ids, name, N, dev):
    if ids.dtype not in (torch.int32, torch.int64):
        _fail(op, f"{name} must be int32 or int64, got {ids.dtype} (use .long())")
    if ids.shape[0] != N:
        _fail(op, f"{name} has {ids.shape[0]} rows but the batch has {N}")
    if ids.device != dev:
        _fail(op, f"{name} is on {ids.device} but the data is on {dev}; move it with .to(x.device)")


def _check_vec(op, t, name, D, dev):
    if t.numel() != D or not (t.dim() == 1 or (t.dim() >= 2 and all(s == 1 for s in t.shape[:-1]))):
        _fail(op, f"{name} must be [{D}] or [1, 1, {D}], got shape {tuple(t.shape)}")
    _check_float(op, t, name)
    if t.device != dev:
        _fail(op, f"{name} is on {t.device} but the data is on {dev}")


def _check_pos(op, pos, rows, D, dev):
    _check_common(op, pos, "pos", 2, f"[{' or '.join(map(str, rows))}, {D}] (use pos_embed[0])")
    if pos.shape[0] not in rows or pos.shape[1] != D:
        _fail(op, f"pos must be [{' or '.join(map(str, rows))}, {D}], got {tuple(pos.shape)} "
                  "(timm/MAE keep it as [1, 1+L, D]: pass pos_embed[0])")
    _check_float(op, pos, "pos")
    if pos.device != dev:
        _fail(op, f"pos is on {pos.device} but the data is on {dev}")


def _promote(*ts):
    dt = None
    for t in ts:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt


def _lastdim_contig(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, traced through with their fake (meta) functions
@torch.library.custom_op(f"{OPS_NS}::gather_visible_fwd", mutates_args=())
def _gather_fwd_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: Optional[torch.Tensor],
                   cls: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    odt = _promote(x, pos, cls)
    if impl == "triton":
        from . import _gs_triton
        N, L, D = x.shape
        C = 1 if cls is not None else 0
        x, pos = _lastdim_contig(x), _lastdim_contig(pos)
        out = torch.empty((N, C + ids_keep.shape[1], D), device=x.device, dtype=odt)
        off = 0 if pos is None else pos.shape[0] - L
        _gs_triton.gather_rows(out, x, ids_keep, S=L, pos=pos, pos_mode=1 if pos is not None else 0,
                               out_row_off=C, pos_row_off=off)
        if C:
            c = cls.reshape(D)
            out[:, 0] = c + pos[0] if (pos is not None and off == 1) else c
        return out
    return _gs_cpu.gather_fwd(x, ids_keep, pos, cls, odt)


@_gather_fwd_op.register_fake
def _(x, ids_keep, pos, cls, impl):
    C = 1 if cls is not None else 0
    return x.new_empty((x.shape[0], C + ids_keep.shape[1], x.shape[2]), dtype=_promote(x, pos, cls))


@torch.library.custom_op(f"{OPS_NS}::gather_visible_bwd", mutates_args=())
def _gather_bwd_op(g: torch.Tensor, ids_keep: torch.Tensor, L: int, has_cls: bool, pos_rows: int,
                   need_x: bool, need_pos: bool, need_cls: bool, x_dtype: torch.dtype,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl != "triton":
        return _gs_cpu.gather_bwd(g, ids_keep, L, has_cls, pos_rows, need_x, need_pos, need_cls, x_dtype)
    from . import _gs_triton
    N, CK, D = g.shape
    C = 1 if has_cls else 0
    K = CK - C
    dev = g.device
    g = _lastdim_contig(g)
    # inverse map [N, L]: kept slot j for kept patches, K (= "no source", filled with 0) elsewhere
    inv = torch.full((N, L), K, device=dev, dtype=torch.int32)
    inv.scatter_(1, ids_keep.long(), torch.arange(K, device=dev, dtype=torch.int32).expand(N, K))
    gx = torch.empty((N, L, D), device=dev, dtype=x_dtype) if need_x else _gs_cpu.nothing(dev)
    body = _gs_triton.gather_rows(gx, g, inv, S=K, fill=torch.zeros(D, device=dev, dtype=torch.float32),
                                  src_row_off=C, store=need_x, acc=need_pos) if (need_x or need_pos) else None
    gc = g[:, 0].sum(0, dtype=torch.float32) if C and (need_cls or (need_pos and pos_rows == L + 1)) else None
    gpos = _gs_cpu.nothing(dev)
    if need_pos:
        gpos = torch.cat([(gc if gc is not None else body.new_zeros(D)).unsqueeze(0), body]) \
            if pos_rows == L + 1 else body
    return gx, gpos, (gc if need_cls else _gs_cpu.nothing(dev))


@_gather_bwd_op.register_fake
def _(g, ids_keep, L, has_cls, pos_rows, need_x, need_pos, need_cls, x_dtype, impl):
    N, _, D = g.shape
    f32 = torch.float32
    return (g.new_empty((N, L, D), dtype=x_dtype) if need_x else g.new_empty(0, dtype=f32),
            g.new_empty((pos_rows, D), dtype=f32) if need_pos else g.new_empty(0, dtype=f32),
            g.new_empty((D,), dtype=f32) if need_cls else g.new_empty(0, dtype=f32))


@torch.library.custom_op(f"{OPS_NS}::scatter_to_full_fwd", mutates_args=())
def _scatter_fwd_op(tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                    pos: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    odt = _promote(tokens, mask_token, pos)
    if impl == "triton":
        from . import _gs_triton
        N, T, Dd = tokens.shape
        L = ids_restore.shape[1]
        tokens, pos = _lastdim_contig(tokens), _lastdim_contig(pos)
        out = torch.empty((N, 1 + L, Dd), device=tokens.device, dtype=odt)
        _gs_triton.gather_rows(out, tokens, ids_restore, S=T - 1, fill=mask_token.reshape(Dd).contiguous(),
                               pos=pos, pos_mode=2 if pos is not None else 0, out_row_off=1,
                               src_row_off=1, pos_row_off=1)
        out[:, 0] = tokens[:, 0] + pos[0] if pos is not None else tokens[:, 0]
        return out
    return _gs_cpu.scatter_fwd(tokens, ids_restore, mask_token, pos, odt)


@_scatter_fwd_op.register_fake
def _(tokens, ids_restore, mask_token, pos, impl):
    return tokens.new_empty((tokens.shape[0], 1 + ids_restore.shape[1], tokens.shape[2]),
                            dtype=_promote(tokens, mask_token, pos))


@torch.library.custom_op(f"{OPS_NS}::scatter_to_full_bwd", mutates_args=())
def _scatter_bwd_op(g: torch.Tensor, ids_restore: torch.Tensor, K: int, need_tokens: bool,
                    need_mask: bool, need_pos: bool, tokens_dtype: torch.dtype,
                    impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl != "triton":
        return _gs_cpu.scatter_bwd(g, ids_restore, K, need_tokens, need_mask, need_pos, tokens_dtype)
    from . import _gs_triton
    N, _, Dd = g.shape
    dev = g.device
    g = _lastdim_contig(g)
    gt = torch.empty((N, 1 + K, Dd), device=dev, dtype=tokens_dtype) if need_tokens else _gs_cpu.nothing(dev)
    accp, accm = _gs_triton.scatter_rows_bwd(gt, g, ids_restore, S=K, store=need_tokens,
                                             acc_pos=need_pos, acc_mask=need_mask)
    if need_tokens:
        gt[:, 0] = g[:, 0]
    gpos = torch.cat([g[:, 0].sum(0, dtype=torch.float32).unsqueeze(0), accp]) if need_pos else _gs_cpu.nothing(dev)
    return gt, (accm if need_mask else _gs_cpu.nothing(dev)), gpos


@_scatter_bwd_op.register_fake
def _(g, ids_restore, K, need_tokens, need_mask, need_pos, tokens_dtype, impl):
    N, T1, Dd = g.shape
    f32 = torch.float32
    return (g.new_empty((N, 1 + K, Dd), dtype=tokens_dtype) if need_tokens else g.new_empty(0, dtype=f32),
            g.new_empty((Dd,), dtype=f32) if need_mask else g.new_empty(0, dtype=f32),
            g.new_empty((T1, Dd), dtype=f32) if need_pos else g.new_empty(0, dtype=f32))


# ----------------------------------------------------------------------------------------------
class _GatherVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos, cls, impl):
        ctx.save_for_backward(ids_keep)
        ctx.meta = (x.shape[1], cls is not None, 0 if pos is None else pos.shape[0], x.dtype,
                    None if pos is None else pos.dtype, None if cls is None else (cls.shape, cls.dtype), impl)
        return _OPS.gather_visible_fwd(x, ids_keep, pos, cls, impl)

    @staticmethod
    def backward(ctx, g):
        (ids_keep,) = ctx.saved_tensors
        L, has_cls, pos_rows, x_dtype, pos_dtype, cls_meta, impl = ctx.meta
        need_x, _, need_pos, need_cls, _ = ctx.needs_input_grad
        gx, gpos, gcls = _OPS.gather_visible_bwd(
            g, ids_keep, L, has_cls, pos_rows, need_x, need_pos, need_cls, x_dtype, impl)
        return (gx if need_x else None, None, gpos.to(pos_dtype) if need_pos else None,
                gcls.reshape(cls_meta[0]).to(cls_meta[1]) if need_cls else None, None)


class _ScatterToFull(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, ids_restore, mask_token, pos, impl):
        ctx.save_for_backward(ids_restore)
        ctx.meta = (tokens.shape[1] - 1, tokens.dtype, mask_token.shape, mask_token.dtype,
                    None if pos is None else pos.dtype, impl)
        return _OPS.scatter_to_full_fwd(tokens, ids_restore, mask_token, pos, impl)

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        K, t_dtype, m_shape, m_dtype, pos_dtype, impl = ctx.meta
        need_t, _, need_m, need_p, _ = ctx.needs_input_grad
        gt, gm, gp = _OPS.scatter_to_full_bwd(g, ids_restore, K, need_t, need_m, need_p,
                                                           t_dtype, impl)
        return (gt if need_t else None, None, gm.reshape(m_shape).to(m_dtype) if need_m else None,
                gp.to(pos_dtype) if need_p else None, None)


def gather_visible(x, ids_keep, pos=None, cls=None):
    """Visible tokens x[n, ids_keep[n, j]] (+ pos of that patch), with the CLS token (+ pos[0]) first.

    x [N, L, D]; ids_keep [N, K] int32/int64 (distinct per row, any order); pos [L, D] or [1 + L, D]
    (row 0 = CLS position, e.g. timm's pos_embed[0]); cls [D] or [1, 1, D].
    Returns [N, K, D], or [N, 1 + K, D] with cls. Output dtype: the promotion of x, pos and cls.
    """
    op = "gather_visible"
    _check_common(op, x, "x", 3, "[N, L, D]")
    _check_float(op, x, "x")
    _check_common(op, ids_keep, "ids_keep", 2, "[N, K]")
    N, L, D = x.shape
    _check_index(op, ids_keep, "ids_keep", N, x.device)
    if ids_keep.shape[1] > L:
        _fail(op, f"ids_keep keeps {ids_keep.shape[1]} tokens but x has only L={L}")
    if pos is not None:
        _check_pos(op, pos, (L, L + 1), D, x.device)
    if cls is not None:
        _check_vec(op, cls, "cls", D, x.device)
    impl = resolve(x.device)
    if impl == "reference":
        return gather_visible_ref(x, ids_keep, pos, cls)
    if cls is not None and _promote(x, pos) != _promote(x, pos, cls):
        # a CLS token wider than x + pos: the reference rounds the patch rows to the narrower
        # dtype first; keep that exactly by doing the body in its own dtype and concatenating
        off = 0 if pos is None else pos.shape[0] - L
        body = _GatherVisible.apply(x, ids_keep, pos, None, impl)
        c = cls.reshape(1, 1, D) + (pos[:1].unsqueeze(0) if pos is not None and off == 1 else 0)
        return torch.cat([c.expand(N, -1, -1), body], 1)
    return _GatherVisible.apply(x, ids_keep, pos, cls, impl)


def scatter_to_full(tokens, ids_restore, mask_token, pos=None):
    """Decoder un-shuffle: [N, 1 + K, Dd] (CLS first) -> [N, 1 + L, Dd] in original patch order.

    out[:, 0] = tokens[:, 0] + pos[0]; out[:, 1 + l] = (tokens[:, 1 + r] if r < K else mask_token)
    + pos[1 + l], r = ids_restore[:, l]. mask_token [Dd] or [1, 1, Dd]; pos [1 + L, Dd] or None.
    Output dtype: the promotion of tokens, mask_token and pos.
    """
    op = "scatter_to_full"
    _check_common(op, tokens, "tokens", 3, "[N, 1 + K, Dd] (CLS first)")
    _check_float(op, tokens, "tokens")
    _check_common(op, ids_restore, "ids_restore", 2, "[N, L]")
    N, T, Dd = tokens.shape
    _check_index(op, ids_restore, "ids_restore", N, tokens.device)
    L = ids_restore.shape[1]
    if T < 1 or T - 1 > L:
        _fail(op, f"tokens has {T} rows: need 1 (CLS) + K kept tokens with K <= L = {L}")
    _check_vec(op, mask_token, "mask_token", Dd, tokens.device)
    if pos is not None:
        _check_pos(op, pos, (L + 1,), Dd, tokens.device)
    impl = resolve(tokens.device)
    if impl == "reference":
        return scatter_to_full_ref(tokens, ids_restore, mask_token, pos)
    return _ScatterToFull.apply(tokens, ids_restore, mask_token, pos, impl)
