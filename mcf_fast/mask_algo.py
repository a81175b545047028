"""The mask algorithms in torch integer arithmetic: the mirror of csrc/mask_algo.h, and block masks.

Arguments arrive checked (mcf_fast.masking validates them); nothing here reads the environment or
picks a backend. Every tensor is int64 or bool and every operation is exact integer or boolean
arithmetic (multiply, shift, mask, compare, cumsum, scatter, nonzero), plus one argsort of keys
that are unique by construction. No float is ever computed, so the same inputs give the same bits on
any device, thread count or torch build: the CPU run in the tests pins the numbers a GPU makes.

Row r = v * N + n of a call (view v, sample n) draws from its own Philox4x32-10 stream:
  key = (seed & 0xffffffff, seed >> 32), counter = (word0, (v << 16) | (sid >> 32) & 0xffff,
  sid & 0xffffffff, step). Uniform masks use word0 = 0, 1, 2, ... (u32 number d is lane d % 4 of
  block d / 4); block masks use word0 >= 2^31 (`BLOCK_DOMAIN`, `TOPUP_DOMAIN`), a range uniform
  masks never reach (they need fewer than 2^31 blocks), so the two kinds draw disjoint numbers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
BLOCK_DOMAIN = 0x80000000  # counter word 0 of block candidate t is BLOCK_DOMAIN + t
TOPUP_DOMAIN = 0xC0000000  # counter word 0 of the top-up keys of patches 4b..4b+3 is TOPUP_DOMAIN + b
_CHUNK = 16  # block candidates turned into rectangles at once: bounds memory at R * 16 * L bools


class Masks(NamedTuple):
    """ids_keep int64 [V, N, K] ascending; ids_restore int64 [V, N, L]; mask bool [V, N, L], True = removed."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


# --------------------------------------------------------------------------------------- Philox
def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a < 2^32 and b int64 holding a u32, without overflow."""
    p0 = a * (b & 0xFFFF)  # < 2^48
    t = (p0 >> 16) + a * (b >> 16)  # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (p0 & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on broadcastable int64 tensors holding u32 words -> 4 int64 tensors (u32)."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def lemire(x: torch.Tensor, rng: int):
    """Lemire's bounded draw on u32 x: (value in [0, rng), accepted?) - the C++ bounded_draw."""
    m = x * rng  # < 2^63
    return m >> 32, (m & MASK32) >= (2**32 - rng) % rng


class RowStreams:
    """The rows' Philox counters and u32 streams (draw d = lane d % 4 of block d / 4)."""

    def __init__(self, ids, V, seed, step):
        view = torch.arange(V, dtype=torch.int64, device=ids.device).repeat_interleave(ids.numel())
        sid = ids.repeat(V)
        self.c1 = (view << 16) | ((sid >> 32) & 0xFFFF)
        self.c2 = sid & MASK32
        self.c3 = step & MASK32
        self.k0, self.k1 = seed & MASK32, seed >> 32
        self.first = None

    def prefetch(self, n_first: int) -> "RowStreams":
        """Compute at least the first `n_first` draws of every row up front (one batched Philox call)."""
        nb = (n_first + 3) // 4 + 1
        self.first = self.lanes(torch.arange(nb, dtype=torch.int64, device=self.c1.device))  # [R, 4 * nb]
        return self

    def blocks(self, word0: torch.Tensor):
        """The 4 lanes [R, len(word0)] of every row's Philox blocks with counter word 0 = word0."""
        return philox4x32_10(word0, self.c1[:, None], self.c2[:, None], self.c3, self.k0, self.k1)

    def lanes(self, word0: torch.Tensor) -> torch.Tensor:
        """[R, 4 * len(word0)]: the blocks' lanes in stream order (block-major)."""
        return torch.stack(self.blocks(word0), dim=2).reshape(self.c1.shape[0], 4 * word0.numel())

    def at(self, rows, d):
        """Draw number d[i] of row rows[i]."""
        n_first = self.first.shape[1]
        out = self.first[rows, d.clamp(max=n_first - 1)]
        late = d >= n_first  # only reachable after rejections
        if bool(late.any()):
            r, dl = rows[late], d[late]
            lanes = philox4x32_10(dl >> 2, self.c1[r], self.c2[r], self.c3, self.k0, self.k1)
            lane = dl & 3
            out[late] = torch.where(lane == 0, lanes[0], torch.where(
                lane == 1, lanes[1], torch.where(lane == 2, lanes[2], lanes[3])))
        return out


# --------------------------------------------------------------------------------------- uniform
def uniform_masks(ids, L, K, V, seed, step, *, bounded=lemire) -> Masks:
    """Same algorithm and bits as csrc/ (Philox + partial Fisher-Yates), vectorised over rows.

    `bounded(x, rng) -> (value, accepted)` is replaceable so the tests can plant a biased draw.
    """
    N = ids.numel()
    R, dev = V * N, ids.device
    M = min(K, L - K)
    stream = RowStreams(ids, V, seed, step).prefetch(M)
    rows = torch.arange(R, dtype=torch.int64, device=dev)
    nxt = torch.zeros(R, dtype=torch.int64, device=dev)
    perm = torch.arange(L, dtype=torch.int64, device=dev).repeat(R, 1)
    for i in range(M):
        rng = L - i
        val, ok = bounded(stream.at(rows, nxt), rng)
        nxt += 1
        while not bool(ok.all()):  # rejections are rare: redraw only those rows
            bad = rows[~ok]
            v2, ok2 = bounded(stream.at(bad, nxt[bad]), rng)
            nxt[bad] += 1
            val[bad], ok[bad] = v2, ok2
        j = (i + val)[:, None]
        pi = perm[:, i].clone()
        perm[:, i] = perm.gather(1, j)[:, 0]
        perm.scatter_(1, j, pi[:, None])
    sel = torch.zeros(R, L, dtype=torch.bool, device=dev)
    sel.scatter_(1, perm[:, :M], True)
    return emit(sel if K <= L - K else ~sel, K, V, N)


def emit(kept, K, V, N) -> Masks:
    """Masks from a [V * N, L] keep indicator with exactly K kept per row (the linear pass)."""
    R, L = kept.shape
    before = torch.cumsum(kept, dim=1) - kept.long()  # kept patches left of l
    pos = torch.arange(L, dtype=torch.int64, device=kept.device)
    restore = torch.where(kept, before, K + pos - before)
    keep = kept.nonzero()[:, 1].reshape(R, K)  # row-major nonzero: ascending within a row
    return Masks(keep.reshape(V, N, K), restore.reshape(V, N, L), (~kept).reshape(V, N, L))


# ----------------------------------------------------------------------------------------- block
def block_geometry(u0, u1, u2, u3, H, W, lo, hi, asp_num, asp_den):
    """(top, left, h, w) [R, T] of candidate rectangles from their Philox lanes; h = 0 when invalid.

    area = lo + u0 * (hi - lo + 1) / 2^32, height h = 1 + u1 * min(area, H) / 2^32, width w =
    round(area / h); valid when 1 <= w <= W and h / w lies within [asp_den / asp_num, asp_num /
    asp_den]; top = u2 * (H - h + 1) / 2^32, left = u3 * (W - w + 1) / 2^32. Each "/ 2^32" is a
    right shift: the floor of an exact integer product below 2^63.
    """
    area = lo + ((u0 * (hi - lo + 1)) >> 32)
    h = 1 + ((u1 * torch.clamp(area, max=H)) >> 32)
    w = (area + h // 2) // h
    valid = (w >= 1) & (w <= W) & (w * asp_den <= h * asp_num) & (h * asp_den <= w * asp_num)
    w = w.clamp(1, W)
    top = (u2 * (H - h + 1)) >> 32
    left = (u3 * (W - w + 1)) >> 32
    return top, left, h * valid, w


def _rectangles(top, left, h, w, H, W):
    """[R, T, H * W] bool: the patches inside each rectangle (none when h = 0)."""
    rr = torch.arange(H, device=top.device)
    cc = torch.arange(W, device=top.device)
    in_r = (rr >= top[..., None]) & (rr < (top + h)[..., None])  # [R, T, H]
    in_c = (cc >= left[..., None]) & (cc < (left + w)[..., None])  # [R, T, W]
    return (in_r[..., :, None] & in_c[..., None, :]).flatten(2)


def block_masks(ids, H, W, K, V, seed, step, lo, hi, asp_num, asp_den, T) -> Masks:
    """Block masks with exactly L - K removed per row.

    Candidate t of a row is Philox block (BLOCK_DOMAIN + t) read by `block_geometry`. Greedy, in
    candidate order (BEiT's rule): a candidate is taken when it adds at most the budget still open
    (one that adds nothing changes nothing). Then the shortfall is removed among the patches still
    visible, those with the smallest top-up keys (u32 lane l % 4 of block TOPUP_DOMAIN + l / 4, ties
    broken by the position), so every row removes exactly L - K patches.
    """
    N = ids.numel()
    R, L, dev = V * N, H * W, ids.device
    s = RowStreams(ids, V, seed, step)
    nb = (L + 3) // 4
    word0 = torch.cat([BLOCK_DOMAIN + torch.arange(T, dtype=torch.int64, device=dev),
                       TOPUP_DOMAIN + torch.arange(nb, dtype=torch.int64, device=dev)])
    u = s.blocks(word0)  # one batched Philox call for the candidates and the top-up keys
    top, left, h, w = block_geometry(*(x[:, :T] for x in u), H, W, lo, hi, asp_num, asp_den)
    free = torch.ones(R, L, dtype=torch.bool, device=dev)
    open_ = torch.full((R,), L - K, dtype=torch.int64, device=dev)  # patches still to remove
    for t0 in range(0, T, _CHUNK):
        t1 = min(T, t0 + _CHUNK)
        rects = _rectangles(top[:, t0:t1], left[:, t0:t1], h[:, t0:t1], w[:, t0:t1], H, W)
        for t in range(t1 - t0):
            new = rects[:, t] & free
            n = new.sum(1)
            take = n <= open_
            free ^= new & take[:, None]  # new lies inside free: xor removes it
            open_ -= n * take
    keys = torch.stack([x[:, T:] for x in u], dim=2).reshape(R, 4 * nb)[:, :L]
    pos = torch.arange(L, dtype=torch.int64, device=dev)
    keys = torch.where(free, keys, 2**32) * L + pos  # unique (position breaks ties): one sorted order
    rank = torch.empty_like(keys).scatter_(1, torch.argsort(keys, dim=1), pos.expand(R, L))
    return emit(free & (rank >= open_[:, None]), K, V, N)


__all__ = ["Masks", "RowStreams", "philox4x32_10", "lemire", "uniform_masks", "block_masks",
           "block_geometry", "emit", "BLOCK_DOMAIN", "TOPUP_DOMAIN"]
