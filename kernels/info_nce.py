"""InfoNCE / MoCo-v3 contrastive loss without the [N, M] logits.

loss = scale * mean_i CE(normalize(q) @ normalize(k).T / T, label_offset + i)

- reference `info_nce_ref`: the plain formulation (logits materialised), in the inputs' dtype;
- CPU path: blocks of q rows against all of k; each block's logits, softmax and both gradient
  contributions are formed while the block is hot in cache, so forward and backward cost the same
  three matmuls as the naive path but extra memory is one block plus O((N + M) C) (gradients are
  computed in the forward when autograd will ask for them, then scaled by the upstream gradient);
- Triton path (CUDA): online log-sum-exp forward, recompute-based dq / dk kernels (_nce_triton.py).
The loss is returned in fp32 (as autocast runs cross-entropy); gradients in q's / k's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backend import OPS_NS, resolve

# rows of q per CPU block: the block's [rows, M] fp32 logits (the only buffer that grows with M)
# stay within 16 MiB; 1024 rows at M = 4096. Measured on the loaded 2-core dev box (2026-11,
# N = M = 4096, fwd+bwd, naive 2446 ms): 4 MiB blocks 3534 ms, 8 MiB 2470 ms, 16 MiB 1907 ms.
_OPS = getattr(torch.ops, OPS_NS)  # this copy's ops (see backend.OPS_NS)
_CPU_BLOCK_ELEMS = 1 << 22


def info_nce_ref(q, k, temperature, label_offset=0, scale=None):
    """Reference: normalise, materialise the logits, cross-entropy against label_offset + i."""
    qn = F.normalize(q, dim=1)
    kn = F.normalize(k, dim=1)
    logits = qn @ kn.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + label_offset
    loss = F.cross_entropy(logits, labels)
    return loss if scale is None else loss * scale


def _check(q, k, temperature, label_offset, scale):
    op = "info_nce"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor [rows, C], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{op}: q has C={q.shape[1]} features but k has {k.shape[1]}")
    if q.device != k.device:
        raise ValueError(f"{op}: q is on {q.device} but k is on {k.device}")
    for name, v in (("temperature", temperature), ("scale", 1.0 if scale is None else scale)):
        if isinstance(v, torch.Tensor) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite Python number (a tensor would force a "
                             f"host sync), got {v!r}")
    if temperature <= 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if not isinstance(label_offset, int) or label_offset < 0 or label_offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"{op}: label_offset={label_offset!r} puts the positives of rows 0..{q.shape[0] - 1} "
                         f"outside k's {k.shape[0]} rows (use N * rank after an all-gather of k)")


def _cpu_forward(qn, kn, inv_t, off, scale, need_dq, need_dk):
    """(loss fp32 scalar, dloss/dqn, dloss/dkn) by blocks of q rows; grads empty when not needed.

    Per block only two elementwise passes touch the [rows, M] buffer (exp, row sum): the 1/T scale
    and the log-sum-exp shift are folded into the matmul, and the softmax normalisation and the
    one-hot target are applied to the [rows, C] products instead of the [rows, M] probabilities.
    """
    N, C = qn.shape
    M = kn.shape[0]
    block = max(1, min(N, _CPU_BLOCK_ELEMS // max(M, 1)))
    coeff = scale * inv_t / N
    # rows are unit vectors, so every logit lies in [-1/T, 1/T]: shifting by 1/T instead of the row
    # max keeps exp() in [e^-2/T, 1], safely normal in fp32 while 2/T < 80 (T > 0.025; MCF: 0.2)
    const_shift = inv_t <= 40.0
    shift = torch.full((1, 1), -inv_t, device=qn.device, dtype=qn.dtype)
    # the positives are the consecutive rows off .. off+N-1 of k: row dot products as one batched
    # matmul, without an [N, C] temporary
    pos = torch.bmm(qn.unsqueeze(1), kn[off:off + N].unsqueeze(2)).view(N).mul_(inv_t)
    ssum = torch.empty(N, device=qn.device, dtype=qn.dtype)
    lse_shift = torch.full((N,), inv_t, device=qn.device, dtype=qn.dtype) if const_shift else \
        torch.empty_like(ssum)
    dq = torch.empty((N, C), device=qn.device, dtype=qn.dtype) if need_dq else None
    dk = torch.zeros((M, C), device=qn.device, dtype=qn.dtype) if need_dk else None
    # one [block, M] buffer reused by every block (no allocator churn), and few, large ops per block:
    # on a busy CPU every op is a parallel region that pays for scheduling
    buf = torch.empty((block, M), device=qn.device, dtype=qn.dtype)
    for s in range(0, N, block):
        qc = qn[s:s + block]
        b = qc.shape[0]
        e = buf[:b]
        if const_shift:
            torch.addmm(shift, qc, kn.t(), alpha=inv_t, out=e)  # logits - 1/T
        else:
            torch.mm(qc, kn.t(), out=e).mul_(inv_t)
            torch.amax(e, 1, out=lse_shift[s:s + b])
            e.sub_(lse_shift[s:s + b].unsqueeze(1))
        sb = torch.sum(e.exp_(), 1, out=ssum[s:s + b])
        if need_dq or need_dk:
            w = (coeff / sb).unsqueeze(1)                      # softmax normaliser, times coeff
            kt = kn[off + s:off + s + b]                        # the block's positive keys
            if need_dq:
                # dq = coeff * (softmax @ kn - kn[target])
                torch.mm(e, kn, out=dq[s:s + b]).mul_(w).sub_(kt, alpha=coeff)
            if need_dk:
                # dk += coeff * (softmax^T @ q - q scattered to the target rows)
                dk.addmm_(e.t(), qc * w)
                dk[off + s:off + s + b].sub_(qc, alpha=coeff)
    total = (ssum.log() + lse_shift - pos).sum(dtype=torch.float64)
    loss = (total * (scale / N)).to(torch.float32)
    # distinct empty tensors: a custom op's outputs may not alias each other
    return loss, (dq if need_dq else qn.new_empty(0)), (dk if need_dk else qn.new_empty(0))


@torch.library.custom_op(f"{OPS_NS}::info_nce_fwd", mutates_args=())
def _nce_fwd_op(qn: torch.Tensor, kn: torch.Tensor, inv_t: float, label_offset: int, scale: float,
                need_dq: bool, need_dk: bool, dot_dtype: torch.dtype,
                impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl != "triton":
        loss, dq, dk = _cpu_forward(qn, kn, inv_t, label_offset, scale, need_dq, need_dk)
        return loss, qn.new_empty(0), dq, dk
    from . import _nce_triton
    lse = _nce_triton.nce_lse(qn, kn, inv_t, dot_dtype)
    N = qn.shape[0]
    pos = (qn * kn[label_offset:label_offset + N]).sum(1) * inv_t
    loss = (lse - pos).sum() * (scale / N)
    return loss, lse, qn.new_empty(0), qn.new_empty(0)


@_nce_fwd_op.register_fake
def _(qn, kn, inv_t, label_offset, scale, need_dq, need_dk, dot_dtype, impl):
    e = qn.new_empty
    if impl != "triton":
        return (e((), dtype=torch.float32), e(0),
                e(qn.shape) if need_dq else e(0), kn.new_empty(kn.shape) if need_dk else e(0))
    return e((), dtype=torch.float32), e(qn.shape[0], dtype=torch.float32), e(0), e(0)


@torch.library.custom_op(f"{OPS_NS}::info_nce_bwd", mutates_args=())
def _nce_bwd_op(qn: torch.Tensor, kn: torch.Tensor, lse: torch.Tensor, inv_t: float, label_offset: int,
                scale: float, need_dq: bool, need_dk: bool,
                dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from . import _nce_triton
    N = qn.shape[0]
    coeff = scale * inv_t / N
    dq, dk = _nce_triton.nce_grads(qn, kn, lse, inv_t, dot_dtype, need_dq, need_dk)
    rows = torch.arange(N, device=qn.device) + label_offset
    if need_dq:
        dq = (dq - kn[label_offset:label_offset + N]).mul_(coeff)
    if need_dk:
        dk = dk.index_add_(0, rows, qn, alpha=-1.0).mul_(coeff)
    return (dq if need_dq else qn.new_empty(0)), (dk if need_dk else qn.new_empty(0))


@_nce_bwd_op.register_fake
def _(qn, kn, lse, inv_t, label_offset, scale, need_dq, need_dk, dot_dtype):
    return (qn.new_empty(qn.shape) if need_dq else qn.new_empty(0)), \
        (kn.new_empty(kn.shape) if need_dk else qn.new_empty(0))


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qn, kn, inv_t, label_offset, scale, dot_dtype, impl):
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, lse, dq, dk = _OPS.info_nce_fwd(qn, kn, inv_t, label_offset, scale,
                                                             need_dq, need_dk, dot_dtype, impl)
        if impl == "triton":
            ctx.save_for_backward(qn, kn, lse)
        else:
            ctx.save_for_backward(dq, dk)
        ctx.meta = (inv_t, label_offset, scale, dot_dtype, impl)
        return loss

    @staticmethod
    def backward(ctx, g):
        inv_t, off, scale, dot_dtype, impl = ctx.meta
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if impl == "triton":
            qn, kn, lse = ctx.saved_tensors
            dq, dk = _OPS.info_nce_bwd(qn, kn, lse, inv_t, off, scale, need_dq, need_dk,
                                                    dot_dtype)
        else:
            dq, dk = ctx.saved_tensors
        return (dq * g if need_dq else None, dk * g if need_dk else None, None, None, None, None, None)


def info_nce(q, k, temperature, label_offset=0, scale=None):
    """scale * mean_i CE(normalize(q) @ normalize(k).T / temperature, label_offset + i), fp32.

    q [N, C]; k [M, C] with M >= label_offset + N (k may be the all-gather of every rank's keys:
    pass label_offset = N * rank). Gradients flow to q, and to k when k requires grad.
    temperature and scale are Python numbers; scale defaults to 1 (MCF / MoCo v3 use 2 * T).
    """
    _check(q, k, temperature, label_offset, scale)
    impl = resolve(q.device)
    if impl == "reference":
        return info_nce_ref(q, k, temperature, label_offset, scale)
    # normalisation is O((N + M) C): plain torch autograd handles it (in fp32), the op sees unit rows
    qn = F.normalize(q.to(torch.float64 if q.dtype == torch.float64 else torch.float32), dim=1)
    kn = F.normalize(k.to(qn.dtype), dim=1)
    return _InfoNCE.apply(qn, kn, 1.0 / float(temperature), int(label_offset),
                          1.0 if scale is None else float(scale), q.dtype, impl)
