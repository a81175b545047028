"""The torch formulation of the gather / scatter ops used for CPU tensors (and for `cpu` on any device).

Why this shape (measured on a 2-core AMX CPU, N=256, L=196, D=768, fp32; see dev/notes/kernels.md):
- rows are moved with a flattened `index_select` on [N*L, D] with an [N*K] index instead of
  `gather` with an index expanded (or, as MAE does, repeated) to [N, K, D]: no D-times-larger int64
  index, and one contiguous row copy per selected token;
- the position embedding is added to the K kept rows only, not to all L before the gather;
- d(pos) and d(mask_token) are fp32 reductions over the gradient already in hand, never a second
  full-size temporary.
All functions here take and return plain tensors (no autograd); the autograd.Function in
gather_scatter.py wires them. Narrowing (fp32 sums -> bf16/fp16) goes through torch's `.to()`, which
rounds to nearest even, exactly as the reference does.
"""
import torch


def nothing(device):
    """A fresh empty fp32 tensor for a gradient not asked for (custom-op outputs may not alias)."""
    return torch.empty(0, device=device, dtype=torch.float32)


def _row_base(n: int, stride: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64).mul_(stride).unsqueeze(1)


def gather_fwd(x, ids, pos, cls, out_dtype):
    """[N, C+K, D]: optional CLS row, then x[n, ids[n, j]] + pos[off + ids[n, j]] (C = cls given)."""
    N, L, D = x.shape
    K = ids.shape[1]
    C = 1 if cls is not None else 0
    ids64 = ids.to(torch.int64)
    # source row of every output row, CLS rows included (they read row 0 and are overwritten below)
    # so that the rows land in `out` with one index_select, without a [N*K, D] temporary
    src = ids64 + _row_base(N, L, x.device)
    if C:
        src = torch.cat([torch.zeros((N, 1), dtype=torch.int64, device=x.device), src], 1)
    src = src.reshape(-1)
    x2 = x.reshape(N * L, D)
    if x.dtype == out_dtype:
        out = torch.index_select(x2, 0, src).view(N, C + K, D)
    else:
        out = x2.index_select(0, src).to(out_dtype).view(N, C + K, D)
    off = 0
    if pos is not None:
        off = pos.shape[0] - L
        prow = ids64 + off
        if C:
            prow = torch.cat([torch.zeros((N, 1), dtype=torch.int64, device=x.device), prow], 1)
        # same rounding as the reference's x + pos: one add in the output dtype
        out.add_(pos.index_select(0, prow.reshape(-1)).view(N, C + K, D))
    if C:
        c = cls.reshape(D)
        if pos is not None and off == 1:
            c = c + pos[0]
        out[:, 0] = c
    return out


def gather_bwd(g, ids, L, has_cls, pos_rows, need_x, need_pos, need_cls, x_dtype):
    """(d x [N, L, D], d pos [pos_rows, D] fp32, d cls [D] fp32); empty tensors where not needed."""
    N, CK, D = g.shape
    C = 1 if has_cls else 0
    K = CK - C
    dev = g.device
    ids64 = ids.to(torch.int64)
    gbody = g[:, C:] if C else g
    gx = nothing(dev)
    if need_x:
        # zeros + one index_copy_ of every gradient row, the CLS rows sent to a spare last row: no
        # [N*K, D] copy of the strided body and no [N, K, D] index; gx is a view of the first N*L rows
        dst = ids64 + _row_base(N, L, dev)
        if C:
            dst = torch.cat([torch.full((N, 1), N * L, dtype=torch.int64, device=dev), dst], 1)
        buf = torch.zeros((N * L + C, D), device=dev, dtype=x_dtype)
        buf.index_copy_(0, dst.reshape(-1), g.reshape(N * CK, D).to(x_dtype))
        gx = buf[:N * L].view(N, L, D)
    gcls32 = g[:, 0].sum(0, dtype=torch.float32) if C and (need_cls or (need_pos and pos_rows == L + 1)) else None
    gpos = nothing(dev)
    if need_pos:
        if need_x and g.dtype == x_dtype:
            # gx holds exact copies of g: its batch sum (one parallel, vectorised pass) is d(pos)
            body = gx.sum(0, dtype=torch.float32)
        else:
            body = torch.zeros((L, D), device=dev, dtype=torch.float32)
            body.index_add_(0, ids64.reshape(-1), gbody.reshape(N * K, D).to(torch.float32))
        if pos_rows == L + 1:
            first = gcls32 if gcls32 is not None else torch.zeros(D, device=dev, dtype=torch.float32)
            gpos = torch.cat([first.unsqueeze(0), body], 0)
        else:
            gpos = body
    gcls = gcls32 if need_cls else nothing(dev)
    return gx, gpos, gcls


def inverse_keep(ids_restore, K):
    """ids_shuffle[:, :K] from ids_restore (its inverse permutation) with one scatter."""
    N, L = ids_restore.shape
    shuffle = torch.empty_like(ids_restore, dtype=torch.int64)
    src = torch.arange(L, device=ids_restore.device, dtype=torch.int64).expand(N, L)
    shuffle.scatter_(1, ids_restore.to(torch.int64), src)
    return shuffle[:, :K]


def scatter_fwd(tokens, ids_restore, mask_token, pos, out_dtype):
    """[N, 1+L, Dd]: CLS row, then tokens[n, 1+r] if r < K else mask_token, plus pos (r = ids_restore)."""
    N, T, Dd = tokens.shape
    K = T - 1
    L = ids_restore.shape[1]
    dev = tokens.device
    # one row table [N*T + 1, Dd] (tokens then the mask token) in the output dtype; every output row
    # is then a single indexed row copy, and pos is added in place afterwards
    table = torch.cat([tokens.reshape(N * T, Dd).to(out_dtype), mask_token.reshape(1, Dd).to(out_dtype)], 0)
    r = ids_restore.to(torch.int64)
    base = _row_base(N, T, dev)
    src = torch.where(r < K, base + 1 + r, torch.full_like(r, N * T))
    src = torch.cat([base, src], 1).reshape(-1)
    out = table.index_select(0, src).view(N, 1 + L, Dd)
    if pos is not None:
        out.add_(pos)
    return out


def scatter_bwd(g, ids_restore, K, need_tokens, need_mask, need_pos, tokens_dtype):
    """(d tokens [N, 1+K, Dd], d mask_token [Dd] fp32, d pos [1+L, Dd] fp32); empty where not needed."""
    N, T1, Dd = g.shape
    dev = g.device
    gpos = g.sum(0, dtype=torch.float32) if need_pos else nothing(dev)
    gt = nothing(dev)
    if need_tokens or (need_mask and g.dtype not in (torch.float32, torch.float64)):
        keep = inverse_keep(ids_restore, K)
        base = _row_base(N, T1, dev)
        src = torch.cat([base, base + 1 + keep], 1).reshape(-1)
        gt = g.reshape(N * T1, Dd).index_select(0, src).view(N, 1 + K, Dd)
    gm = nothing(dev)
    if need_mask:
        if g.dtype in (torch.float32, torch.float64):
            # BLAS sum of the masked rows: [N, 1, L] @ [N, L, Dd] reads g once, accumulates in g's dtype
            w = (ids_restore >= K).to(g.dtype).unsqueeze(1)
            gm = torch.bmm(w, g[:, 1:]).sum((0, 1), dtype=torch.float32)
        else:
            # half-precision g: all rows minus the visible ones, both summed in fp32 (the fp32
            # cancellation error is far below the half-precision rounding of the reference)
            total = gpos[1:].sum(0) if need_pos else g[:, 1:].sum((0, 1), dtype=torch.float32)
            gm = total - gt[:, 1:].sum((0, 1), dtype=torch.float32)
    if need_tokens:
        gt = gt.to(tokens_dtype)
    else:
        gt = nothing(dev)
    return gt, gm, gpos
