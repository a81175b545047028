"""The torch formulation of the gather / scatter ops used for CPU tensors (and for `cpu` on any device).

Why this shape (measured on a 2-core AMX CPU, N=256, L=196, D=768, fp32; see docs/notes/issue-3.md):
- rows are moved with a flattened `index_select` on [N*L, D] with an [N*K] index instead of
  `gather` with an index expanded (or, as MAE does, repeated) to [N, K, D]: no D-times-larger int64
  index, and one contiguous row copy per selected token;
- the position embedding is added to the K kept rows only, not to all L before the gather;
- d(pos) and d(mask_token) are fp32 reductions over the gradient already in hand, never a second
  full-size temporary.
All functions here take and return plain tensors (no autograd); the autograd.Function in
gather_scatter.py wires them.
"""
import torch


def _row_base(n: int, stride: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64).mul_(stride).unsqueeze(1)


def gather_fwd(x, ids, pos, cls, out_dtype):
    """[N, C+K, D]: optional CLS row, then x[n, ids[n, j]] + pos[off + ids[n, j]] (C = cls given)."""
    N, L, D = x.shape
    K = ids.shape[1]
    C = 1 if cls is not None else 0
    ids64 = ids.to(torch.int64)
    flat = (ids64 + _row_base(N, L, x.device)).reshape(-1)
    xs = x.reshape(N * L, D).index_select(0, flat).view(N, K, D)
    out = torch.empty((N, C + K, D), device=x.device, dtype=out_dtype)
    body = out[:, C:] if C else out
    off = 0
    if pos is not None:
        off = pos.shape[0] - L
        ps = pos.index_select(0, ids64.reshape(-1) + off if off else ids64.reshape(-1)).view(N, K, D)
        torch.add(xs, ps, out=body)
    else:
        body.copy_(xs)
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
    empty = torch.empty(0, device=dev)
    gbody = g[:, C:] if C else g
    gx = empty
    if need_x:
        # zeros + index_copy_ of [N*K] rows: cheaper than scatter_ with an [N, K, D] index
        gx = torch.zeros((N * L, D), device=dev, dtype=x_dtype)
        gx.index_copy_(0, (ids64 + _row_base(N, L, dev)).reshape(-1), gbody.reshape(N * K, D).to(x_dtype))
        gx = gx.view(N, L, D)
    gcls32 = g[:, 0].sum(0, dtype=torch.float32) if C and (need_cls or (need_pos and pos_rows == L + 1)) else None
    gpos = empty
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
    gcls = gcls32 if need_cls else empty
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
    L = T1 - 1
    dev = g.device
    empty = torch.empty(0, device=dev)
    gpos = g.sum(0, dtype=torch.float32) if need_pos else empty
    gt = empty
    if need_tokens or (need_mask and g.dtype not in (torch.float32, torch.float64)):
        keep = inverse_keep(ids_restore, K)
        base = _row_base(N, T1, dev)
        src = torch.cat([base, base + 1 + keep], 1).reshape(-1)
        gt = g.reshape(N * T1, Dd).index_select(0, src).view(N, 1 + K, Dd)
    gm = empty
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
        gt = empty
    return gt, gm, gpos
