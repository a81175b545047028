"""Triton kernels for the masked-token gather / scatter (imported only when the Triton backend runs).

Two kernels serve all four directions (gather and scatter are adjoints):

`_gather_rows_fwd_kernel` ("pull"): for every output row r of sample n, read source row
    idx[n, r] (or a fill vector when that index is out of [0, S)), optionally add a position row
    (indexed by the source index or by the output row), store it, and optionally accumulate the
    stored value over the samples of the program's group in fp32 (a column sum for d(pos)).
      gather_visible forward   : idx = ids_keep,         pos by source index
      scatter_to_full forward  : idx = ids_restore,      fill = mask_token, pos by output row
      gather_visible backward  : idx = inverse of ids_keep (K where masked), fill = 0, accumulate d(pos)

`_scatter_rows_bwd_kernel` ("push"): for every source row l of sample n, write it to output row
    idx[n, l] when idx < S, and accumulate fp32 column sums of all rows (d(pos)) and of the rows
    with idx >= S (d(mask_token)). One read of the decoder gradient gives all three gradients.
      scatter_to_full backward : idx = ids_restore

Offsets are int64 (N * L * D passes 2^31 at batch 4096); the feature dim is contiguous (the
launcher enforces stride 1) so that loads and stores vectorise to 16-byte accesses when rows are
16-byte aligned; every other stride is passed explicitly.

Rounding: values are carried in fp32 and narrowed by the store into the output's dtype. Compiled
Triton rounds fp32 -> bf16/fp16 to nearest even, as torch's `.to()` does in the reference and the CPU
path, so outputs and gradients match them bit for bit (tests/test_kernels_gpu.py). Triton 3.8's
interpreter (TRITON_INTERPRET=1) truncates fp32 -> bf16 instead, so interpreted runs can differ by
one bf16 step wherever a store narrows (tests/test_kernels_interpret.py says what it can prove).
"""
import triton
import triton.language as tl


@triton.jit
def _gather_rows_fwd_kernel(
    out_ptr, src_ptr, idx_ptr, fill_ptr, pos_ptr, acc_ptr,
    N, R, S, D, N_PER_PROG,
    stride_out_n, stride_out_r, stride_src_n, stride_src_s, stride_idx_n, stride_idx_r,
    stride_pos_r, stride_acc_g, stride_acc_r,
    out_row_off, src_row_off, pos_row_off,
    HAS_FILL: tl.constexpr, POS_MODE: tl.constexpr, STORE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < R
    dmask = cols < D
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=dmask, other=0.0).to(tl.float32)
    if POS_MODE == 2:  # position row follows the output row: load it once for all samples
        pos_out = tl.load(pos_ptr + (pos_row_off + rows)[:, None] * stride_pos_r + cols[None, :],
                          mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n0 = pid_g * N_PER_PROG
    for i in range(0, N_PER_PROG):
        n = n0 + i
        rm = rmask & (n < N)
        m = rm[:, None] & dmask[None, :]
        src_row = tl.load(idx_ptr + n * stride_idx_n + rows * stride_idx_r, mask=rm, other=0).to(tl.int64)
        if HAS_FILL:
            valid = (src_row >= 0) & (src_row < S)
            lm = m & valid[:, None]
        else:
            lm = m
        v = tl.load(src_ptr + n * stride_src_n + (src_row_off + src_row)[:, None] * stride_src_s
                    + cols[None, :], mask=lm, other=0.0).to(tl.float32)
        if HAS_FILL:
            v = tl.where(valid[:, None], v, fill[None, :])
        if POS_MODE == 1:
            v += tl.load(pos_ptr + (pos_row_off + src_row)[:, None] * stride_pos_r + cols[None, :],
                         mask=m, other=0.0).to(tl.float32)
        if POS_MODE == 2:
            v += pos_out
        if STORE:
            tl.store(out_ptr + n * stride_out_n + (out_row_off + rows)[:, None] * stride_out_r
                     + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=m)
        if ACC:
            acc += tl.where(m, v, 0.0)
    if ACC:
        tl.store(acc_ptr + pid_g * stride_acc_g + rows[:, None] * stride_acc_r + cols[None, :], acc,
                 mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _scatter_rows_bwd_kernel(
    dst_ptr, src_ptr, idx_ptr, accp_ptr, accm_ptr,
    N, R, S, D, N_PER_PROG,
    stride_dst_n, stride_dst_r, stride_src_n, stride_src_r, stride_idx_n, stride_idx_r,
    stride_accp_g, stride_accp_r, stride_accm_g, stride_accm_b,
    src_row_off, dst_row_off,
    STORE: tl.constexpr, ACC_POS: tl.constexpr, ACC_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < R
    dmask = cols < D
    accp = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    accm = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n0 = pid_g * N_PER_PROG
    for i in range(0, N_PER_PROG):
        n = n0 + i
        rm = rmask & (n < N)
        m = rm[:, None] & dmask[None, :]
        dst_row = tl.load(idx_ptr + n * stride_idx_n + rows * stride_idx_r, mask=rm, other=0).to(tl.int64)
        g = tl.load(src_ptr + n * stride_src_n + (src_row_off + rows)[:, None] * stride_src_r
                    + cols[None, :], mask=m, other=0.0)
        vis = (dst_row >= 0) & (dst_row < S)
        if STORE:
            tl.store(dst_ptr + n * stride_dst_n + (dst_row_off + dst_row)[:, None] * stride_dst_r
                     + cols[None, :], g.to(dst_ptr.dtype.element_ty), mask=m & vis[:, None])
        g32 = g.to(tl.float32)
        if ACC_POS:
            accp += g32
        if ACC_MASK:
            accm += tl.where(vis[:, None], 0.0, g32)
    if ACC_POS:
        tl.store(accp_ptr + pid_g * stride_accp_g + rows[:, None] * stride_accp_r + cols[None, :], accp,
                 mask=rmask[:, None] & dmask[None, :])
    if ACC_MASK:
        tl.store(accm_ptr + pid_g * stride_accm_g + pid_r * stride_accm_b + cols, tl.sum(accm, axis=0),
                 mask=dmask)


def _blocks(R, D):
    # 16-byte vectors need BLOCK_D >= 8 (bf16) and a power of two; 2048-element tiles keep 16 values
    # per thread at 4 warps, enough loads in flight without spilling (see the AOT test's report).
    block_d = min(256, triton.next_power_of_2(max(D, 8)))
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), 2048 // block_d))
    return block_r, block_d


def _groups(N, tiles, acc):
    # Without a reduction every sample gets its own programs; with one, samples are split into G
    # groups whose fp32 partial sums are added by torch afterwards (deterministic, no atomics).
    if not acc:
        return N, 1
    g = max(1, min(N, triton.cdiv(1024, tiles)))
    per = triton.cdiv(N, g)
    return triton.cdiv(N, per), per


def gather_rows(out, src, idx, *, S, fill=None, pos=None, pos_mode=0, out_row_off=0, src_row_off=0,
                pos_row_off=0, store=True, acc=False, rows=None):
    """Pull rows: out[n, out_row_off + r] = (src[n, src_row_off + idx[n, r]] or fill) + pos.

    Returns the fp32 column sums over n of the stored rows, shape [R, D], when acc=True.
    """
    import torch
    N, R = idx.shape
    D = src.shape[-1]
    if N == 0 or R == 0 or D == 0:  # nothing to move (mask_ratio = 1.0 keeps K = 0 rows): no empty launch
        return torch.zeros((R, D), device=src.device, dtype=torch.float32) if acc else None
    block_r, block_d = _blocks(R, D)
    tiles = triton.cdiv(R, block_r) * triton.cdiv(D, block_d)
    G, per = _groups(N, tiles, acc)
    part = torch.empty((G, R, D), device=src.device, dtype=torch.float32) if acc else src
    dummy = src
    grid = (G, triton.cdiv(R, block_r), triton.cdiv(D, block_d))
    _gather_rows_fwd_kernel[grid](
        out if store else dummy, src, idx, fill if fill is not None else dummy,
        pos if pos is not None else dummy, part,
        N, R, S, D, per,
        out.stride(0) if store else 0, out.stride(1) if store else 0, src.stride(0), src.stride(1),
        idx.stride(0), idx.stride(1),
        pos.stride(0) if pos is not None else 0,
        part.stride(0) if acc else 0, part.stride(1) if acc else 0,
        out_row_off, src_row_off, pos_row_off,
        HAS_FILL=fill is not None, POS_MODE=pos_mode, STORE=store, ACC=acc,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return part.sum(0) if acc else None


def scatter_rows_bwd(dst, src, idx, *, S, src_row_off=1, dst_row_off=1, store=True, acc_pos=False,
                     acc_mask=False):
    """Push rows: dst[n, dst_row_off + idx[n, l]] = src[n, src_row_off + l] where idx < S.

    Returns (column sums over n of all rows [R, D], sum over n and rows with idx >= S [D]), fp32,
    each None when not asked for.
    """
    import torch
    N, R = idx.shape
    D = src.shape[-1]
    if N == 0 or R == 0 or D == 0:
        f32 = dict(device=src.device, dtype=torch.float32)
        return (torch.zeros((R, D), **f32) if acc_pos else None), (torch.zeros(D, **f32) if acc_mask else None)
    block_r, block_d = _blocks(R, D)
    nrb = triton.cdiv(R, block_r)
    G, per = _groups(N, nrb * triton.cdiv(D, block_d), acc_pos or acc_mask)
    f32 = dict(device=src.device, dtype=torch.float32)
    accp = torch.empty((G, R, D), **f32) if acc_pos else src
    accm = torch.empty((G, nrb, D), **f32) if acc_mask else src
    grid = (G, nrb, triton.cdiv(D, block_d))
    _scatter_rows_bwd_kernel[grid](
        dst if store else src, src, idx, accp, accm,
        N, R, S, D, per,
        dst.stride(0) if store else 0, dst.stride(1) if store else 0, src.stride(0), src.stride(1),
        idx.stride(0), idx.stride(1),
        accp.stride(0) if acc_pos else 0, accp.stride(1) if acc_pos else 0,
        accm.stride(0) if acc_mask else 0, accm.stride(1) if acc_mask else 0,
        src_row_off, dst_row_off,
        STORE=store, ACC_POS=acc_pos, ACC_MASK=acc_mask,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return (accp.sum(0) if acc_pos else None), (accm.sum((0, 1)) if acc_mask else None)
