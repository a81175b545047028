"""Triton kernels for the tiled InfoNCE (imported only when the Triton backend runs).

Inputs are the L2-normalised q [N, C] and k [M, C] in fp32; each tile is cast to DOT_DTYPE
(the caller's dtype: bf16/fp16 run the tensor cores, fp32 uses IEEE fp32 dots, never TF32, so
fp32 callers get fp32 answers). Accumulation is fp32 throughout. The [N, M] logits only ever exist
as one [BLOCK_N, BLOCK_M] tile in registers:
  _info_nce_fwd_kernel     one program per block of q rows: online log-sum-exp over all of k
  _info_nce_bwd_dq_kernel  one program per block of q rows: dq = sum_j p_ij k_j
  _info_nce_bwd_dk_kernel  one program per block of k rows: dk = sum_i p_ij q_i
(the -1 of the positive pair, the 1/T and the scale/N factors are applied by the caller in torch,
O((N + M) C)). Flash-attention's backward splits the same way; two launches keep it free of atomics.
"""
import triton
import triton.language as tl


@triton.jit
def _info_nce_fwd_kernel(
    q_ptr, k_ptr, lse_ptr, N, M, C, stride_q_n, stride_k_m, inv_t,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cc < C
    q = tl.load(q_ptr + rows[:, None] * stride_q_n + cc[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        kmask = cols < M
        k = tl.load(k_ptr + cols[:, None] * stride_k_m + cc[None, :], mask=kmask[:, None] & cmask[None, :],
                    other=0.0).to(DOT_DTYPE)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(kmask[None, :], s * inv_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=rmask)


@triton.jit
def _info_nce_bwd_dq_kernel(
    q_ptr, k_ptr, lse_ptr, dq_ptr, N, M, C, stride_q_n, stride_k_m, stride_dq_n, inv_t,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cc < C
    q = tl.load(q_ptr + rows[:, None] * stride_q_n + cc[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        kmask = cols < M
        k = tl.load(k_ptr + cols[:, None] * stride_k_m + cc[None, :], mask=kmask[:, None] & cmask[None, :],
                    other=0.0).to(DOT_DTYPE)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        p = tl.where(kmask[None, :], tl.exp(s * inv_t - lse[:, None]), 0.0)
        if IEEE:
            acc = tl.dot(p.to(DOT_DTYPE), k, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(DOT_DTYPE), k, acc)
    tl.store(dq_ptr + rows[:, None] * stride_dq_n + cc[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _info_nce_bwd_dk_kernel(
    q_ptr, k_ptr, lse_ptr, dk_ptr, N, M, C, stride_q_n, stride_k_m, stride_dk_m, inv_t,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cc = tl.arange(0, BLOCK_C)
    kmask = cols < M
    cmask = cc < C
    k = tl.load(k_ptr + cols[:, None] * stride_k_m + cc[None, :], mask=kmask[:, None] & cmask[None, :],
                other=0.0).to(DOT_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        q = tl.load(q_ptr + rows[:, None] * stride_q_n + cc[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        # s^T tile [BLOCK_M, BLOCK_N] directly, so that p^T @ q needs no transpose of p
        if IEEE:
            st = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            st = tl.dot(k, tl.trans(q))
        pt = tl.where(rmask[None, :], tl.exp(st * inv_t - lse[None, :]), 0.0)
        if IEEE:
            acc = tl.dot(pt.to(DOT_DTYPE), q, acc, input_precision="ieee")
        else:
            acc = tl.dot(pt.to(DOT_DTYPE), q, acc)
    tl.store(dk_ptr + cols[:, None] * stride_dk_m + cc[None, :], acc, mask=kmask[:, None] & cmask[None, :])


def _cfg(C, dtype_is_fp32, kernel="fwd"):
    """Tile sizes for one kernel: whole feature rows (BLOCK_C = C rounded up to a power of two).

    Chosen from the sm_90 ahead-of-time compile report (tests/test_kernels_aot.py, 2026-11): at
    C = 256 the accumulating kernels keep their [rows, C] fp32 accumulator at 32 rows, which holds
    them under 160 registers without spills; 64 rows hit the 255-register cap (fp32 spilled).
    fp32 at C = 256 also halves the streamed tile of the two backward kernels: triton 3.6 (the H200
    image's) spilled 5.9-6.3 KB of stack at 32 x 32 there (2026-12-01), 0 at 32 x 16 / 16 x 32.
    """
    block_c = max(16, triton.next_power_of_2(C))
    if block_c > 256:
        raise ValueError(f"info_nce Triton kernels support feature dims up to 256, got C={C}; "
                         "use set_backend('cpu') (the blocked torch path also runs on CUDA)")
    if dtype_is_fp32:
        bn, bm = {"dq": (32, 16), "dk": (16, 32)}.get(kernel, (32, 32)) if block_c == 256 else (32, 32)
    else:
        bn, bm = {"fwd": (64, 32), "dq": (32, 64), "dk": (64, 32)}[kernel]
    return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_C=block_c, num_warps=8, num_stages=3)


def _dot_dtype(torch_dtype):
    import torch
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(torch_dtype, tl.float32)


def _ieee(torch_dtype):
    # fp32 / fp64 callers get IEEE fp32 dots (TF32 would cost ~3 decimal digits of the logits)
    return _dot_dtype(torch_dtype) == tl.float32


def nce_lse(qn, kn, inv_t, dot_dtype):
    """Row log-sum-exp of (qn @ kn.T) * inv_t, [N] fp32, never forming the logits."""
    import torch
    N, C = qn.shape
    M = kn.shape[0]
    cfg = _cfg(C, _ieee(dot_dtype), "fwd")
    lse = torch.empty(N, device=qn.device, dtype=torch.float32)
    _info_nce_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        qn, kn, lse, N, M, C, qn.stride(0), kn.stride(0), inv_t,
        DOT_DTYPE=_dot_dtype(dot_dtype), IEEE=_ieee(dot_dtype), **cfg)
    return lse


def nce_grads(qn, kn, lse, inv_t, dot_dtype, need_dq, need_dk):
    """(P @ kn [N, C], P^T @ qn [M, C]) in fp32 with P = softmax rows; None where not needed."""
    import torch
    N, C = qn.shape
    M = kn.shape[0]
    common = dict(DOT_DTYPE=_dot_dtype(dot_dtype), IEEE=_ieee(dot_dtype))
    dq = dk = None
    if need_dq:
        cfg = _cfg(C, _ieee(dot_dtype), "dq")
        dq = torch.empty((N, C), device=qn.device, dtype=torch.float32)
        _info_nce_bwd_dq_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            qn, kn, lse, dq, N, M, C, qn.stride(0), kn.stride(0), dq.stride(0), inv_t, **common, **cfg)
    if need_dk:
        cfg = _cfg(C, _ieee(dot_dtype), "dk")
        dk = torch.empty((M, C), device=qn.device, dtype=torch.float32)
        _info_nce_bwd_dk_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            qn, kn, lse, dk, N, M, C, qn.stride(0), kn.stride(0), dk.stride(0), inv_t, **common, **cfg)
    return dq, dk
