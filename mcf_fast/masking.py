"""Random patch masks for MAE-style training, reproducible per sample.

`random_masks(batch_size, num_patches, mask_ratio, *, views=1, seed, step=0, sample_ids=None,
device="cpu") -> Masks(ids_keep, ids_restore, mask)`:
- `ids_keep`    int64 [V, N, K], K = int(L * (1 - mask_ratio)) as MAE computes it; kept patch
  indices in ASCENDING order (the model may rely on it: gathered tokens keep raster order);
- `ids_restore` int64 [V, N, L]: the inverse of `ids_shuffle = cat(ids_keep, ids_removed)` with
  `ids_removed` ascending too, i.e. exactly MAE's `argsort(ids_shuffle)`: kept patch l gets its
  rank among kept patches, removed patch l gets K + its rank among removed patches;
- `mask`        bool [V, N, L], True = removed (MAE's float mask is `mask.float()`).

Row (v, n) is a function of (seed, step, sample_ids[n], v) alone (Philox4x32-10 keyed by the seed,
counter from step / sample id / view; see csrc/mask_algo.h), so it does not depend on the batch it
is in, the rank, the thread count or the device. Views are prefix-stable: view v of a `views=V`
call equals view v of any call with more views, in particular view 0 equals the `views=1` mask;
distinct views (and samples, and steps) draw from disjoint counters, hence are independent.

Backends: the compiled op `torch.ops.mcf_fast.random_masks` (mcf_fast._C, CPU with OpenMP and CUDA)
or, when the extension is missing or lacks the device, `_random_masks_torch`, the same algorithm in
vectorised int64 torch arithmetic: same bits, slower, logged once. `MCF_FAST_MASKS=torch` forces it.

`block_masks(batch_size, grid, mask_ratio, ...)`: BEiT-style block-wise masks in the same format,
with the same exact budget (L - K removed per row) and per-sample determinism; pure torch.
"""
from __future__ import annotations

import logging
import operator
import os
from typing import NamedTuple

import torch

__all__ = ["Masks", "block_masks", "num_kept", "random_masks"]

_log = logging.getLogger(__name__)

_MAX_L = 2**31 - 1  # internal indices are uint32 ranges; ids fit int64 regardless
_MAX_VIEWS = 2**16  # view occupies 16 bits of the Philox counter
_MAX_STEP = 2**32 - 1  # step occupies one 32-bit counter word
_MAX_SAMPLE_ID = 2**48 - 1  # sample id occupies 48 bits of the counter
_MASK32 = 0xFFFFFFFF


class Masks(NamedTuple):
    """Outputs of `random_masks` (see the module docstring for the conventions)."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), exactly MAE's `len_keep`."""
    return int(num_patches * (1 - mask_ratio))


# ----------------------------------------------------------------------------------- validation
def _as_int(name, value, lo, hi, hint):
    if torch.compiler.is_compiling() and not isinstance(value, (bool, float)):
        # Under torch.compile a changing int (the step) becomes symbolic; operator.index would
        # specialise it and recompile every step. A range check only adds a guard.
        if not lo <= value <= hi:
            raise ValueError(f"random_masks: {name} must be in [{lo}, {hi}]; {hint}")
        return value
    if isinstance(value, bool):
        raise TypeError(f"random_masks: {name} must be an int, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"random_masks: {name} must be an int, got {type(value).__name__} "
                        f"{value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"random_masks: {name} must be in [{lo}, {hi}], got {v}; {hint}")
    return v


def _check_device(device):
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"random_masks: device={device!r} is not a device; pass 'cpu', 'cuda' "
                         f"or 'cuda:N' ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"random_masks: device {dev} is not supported; use 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"random_masks: device={device!r} but CUDA is not available; "
                               f"pass device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_sample_ids(sample_ids, batch_size, dev):
    if sample_ids is None:
        return torch.arange(batch_size, dtype=torch.int64, device=dev)
    if not isinstance(sample_ids, torch.Tensor):
        raise TypeError(f"random_masks: sample_ids must be a 1-D int64 tensor, got "
                        f"{type(sample_ids).__name__}")
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"random_masks: sample_ids must be int64 (or int32), got {sample_ids.dtype}")
    if tuple(sample_ids.shape) != (batch_size,):
        raise ValueError(f"random_masks: sample_ids must have shape [batch_size] = [{batch_size}], "
                         f"got {tuple(sample_ids.shape)}")
    if sample_ids.device != dev:
        raise ValueError(f"random_masks: sample_ids is on {sample_ids.device} but device={dev}; "
                         f"move it with sample_ids.to({str(dev)!r})")
    # A value check needs the data on the host: done for CPU tensors only (no sync on GPU, where
    # ids beyond 2^48 would alias, documented), and skipped while torch.compile traces.
    if dev.type == "cpu" and batch_size > 0 and not torch.compiler.is_compiling():
        lo, hi = int(sample_ids.min()), int(sample_ids.max())
        if lo < 0 or hi > _MAX_SAMPLE_ID:
            raise ValueError(f"random_masks: sample_ids must be in [0, 2^48), got values in "
                             f"[{lo}, {hi}]; pass global sample indices")
    return sample_ids.to(torch.int64).contiguous()


# -------------------------------------------------------------------------------------- backends
_EXT = None  # None = not tried yet, False = unavailable, else the mcf_fast._C module
_WARNED = set()


def _warn_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        _log.warning(msg)


def _extension():
    global _EXT
    if _EXT is None:
        try:
            from mcf_fast import _C
            _EXT = _C
        except ImportError as e:
            _EXT = False
            _warn_once("noext", f"mcf_fast._C cannot be imported ({e}); random masks use the pure-torch "
                       "fallback (same masks, slower). Fix: from the repository, with torch installed, "
                       "`pip install -v --no-build-isolation -e .` and read the lines starting "
                       "'[mcf_fast setup]' (an _C built against another torch must be rebuilt the same way)")
    return _EXT


def _use_extension(dev):
    choice = os.environ.get("MCF_FAST_MASKS", "auto").lower()
    if choice not in ("auto", "ext", "torch"):
        raise ValueError(f"MCF_FAST_MASKS={choice!r}: use 'auto', 'ext' or 'torch'")
    if choice == "torch":
        return False
    ext = _extension()
    ok = bool(ext) and (dev.type == "cpu" or getattr(ext, "WITH_CUDA", 0) == 1)
    if not ok:
        why = "not built" if not ext else "built without CUDA"
        if choice == "ext":
            raise RuntimeError(f"MCF_FAST_MASKS=ext but mcf_fast._C is {why} for {dev.type}; "
                               "rebuild it (see setup.py) or unset MCF_FAST_MASKS")
        if ext:
            _warn_once(f"nocuda:{dev.type}", f"mcf_fast._C is {why}: masks on {dev.type} use the "
                       "pure-torch fallback (same masks, slower); `MCF_FAST_BUILD_CUDA=1 pip install -v "
                       "--no-build-isolation -e .` builds the CUDA part or says what is missing")
    return ok


def _validate(batch_size, num_patches, mask_ratio, views, seed, step, sample_ids, device):
    N = _as_int("batch_size", batch_size, 0, 2**31 - 1, "pass the number of samples")
    L = _as_int("num_patches", num_patches, 1, _MAX_L, "the index arithmetic is 32-bit")
    V = _as_int("views", views, 1, _MAX_VIEWS, "the view index has 16 bits in the RNG counter")
    seed = _as_int("seed", seed, 0, 2**64 - 1, "pass a non-negative seed below 2^64")
    step = _as_int("step", step, 0, _MAX_STEP, "the step has 32 bits in the RNG counter")
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:  # also rejects NaN
        raise ValueError(f"random_masks: mask_ratio must be in [0, 1), got {mask_ratio}")
    K = num_kept(L, ratio)
    if not 1 <= K <= L:
        raise ValueError(f"random_masks: mask_ratio={ratio} keeps K=int({L} * (1 - {ratio}))={K} "
                         f"of {L} patches; lower the ratio so that at least one patch is kept")
    dev = _check_device(device)
    ids = _check_sample_ids(sample_ids, N, dev)
    return N, L, V, seed, step, K, dev, ids


def random_masks(batch_size, num_patches, mask_ratio, *, views=1, seed, step=0, sample_ids=None,
                 device="cpu") -> Masks:
    """Uniform random masks for `views` views of `batch_size` samples; see the module docstring."""
    _, L, V, seed, step, K, dev, ids = _validate(batch_size, num_patches, mask_ratio, views, seed,
                                                 step, sample_ids, device)
    if _use_extension(dev):
        # The op takes the seed as int64: seeds >= 2^63 travel as their two's complement.
        s64 = seed - 2**64 if seed >= 2**63 else seed
        return Masks(*torch.ops.mcf_fast.random_masks(ids, L, K, V, s64, step))
    return _random_masks_torch(ids, L, K, V, seed, step)


# ------------------------------------------------------------------ pure-torch mirror of csrc/
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a < 2^32 and b int64 holding a u32, without overflow."""
    p0 = a * (b & 0xFFFF)  # < 2^48
    t = (p0 >> 16) + a * (b >> 16)  # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (p0 & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on broadcastable int64 tensors holding u32 words -> 4 int64 tensors (u32)."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _lemire(x: torch.Tensor, rng: int):
    """Lemire's bounded draw on u32 x: (value in [0, rng), accepted?) - the C++ bounded_draw."""
    m = x * rng  # < 2^63
    return m >> 32, (m & _MASK32) >= (2**32 - rng) % rng


class _TorchStream:
    """The rows' u32 streams (draw d = lane d % 4 of Philox block d / 4), first draws precomputed."""

    def __init__(self, ids, V, seed, step, n_first):
        dev = ids.device
        view = torch.arange(V, dtype=torch.int64, device=dev).repeat_interleave(ids.numel())
        sid = ids.repeat(V)
        self.c1 = (view << 16) | ((sid >> 32) & 0xFFFF)
        self.c2 = sid & _MASK32
        self.c3 = step & _MASK32
        self.k0, self.k1 = seed & _MASK32, seed >> 32
        nb = (n_first + 3) // 4 + 1
        blk = torch.arange(nb, dtype=torch.int64, device=dev)
        lanes = philox4x32_10(blk, self.c1[:, None], self.c2[:, None], self.c3, self.k0, self.k1)
        self.first = torch.stack(lanes, dim=2).reshape(-1, 4 * nb)  # [R, 4 * nb]

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


def _random_masks_torch(ids, L, K, V, seed, step, *, _bounded=_lemire) -> Masks:
    """Same algorithm and bits as csrc/ (Philox + partial Fisher-Yates), vectorised over rows.

    `_bounded(x, rng) -> (value, accepted)` is replaceable so the tests can plant a biased draw.
    """
    N = ids.numel()
    R, dev = V * N, ids.device
    M = min(K, L - K)
    stream = _TorchStream(ids, V, seed, step, M)
    rows = torch.arange(R, dtype=torch.int64, device=dev)
    nxt = torch.zeros(R, dtype=torch.int64, device=dev)
    perm = torch.arange(L, dtype=torch.int64, device=dev).repeat(R, 1)
    for i in range(M):
        rng = L - i
        val, ok = _bounded(stream.at(rows, nxt), rng)
        nxt += 1
        while not bool(ok.all()):  # rejections are rare: redraw only those rows
            bad = rows[~ok]
            v2, ok2 = _bounded(stream.at(bad, nxt[bad]), rng)
            nxt[bad] += 1
            val[bad], ok[bad] = v2, ok2
        j = (i + val)[:, None]
        pi = perm[:, i].clone()
        perm[:, i] = perm.gather(1, j)[:, 0]
        perm.scatter_(1, j, pi[:, None])
    sel = torch.zeros(R, L, dtype=torch.bool, device=dev)
    sel.scatter_(1, perm[:, :M], True)
    return _emit(sel if K <= L - K else ~sel, K, V, N)


def _emit(kept, K, V, N) -> Masks:
    """Masks from a [V * N, L] keep indicator with exactly K kept per row (the linear pass)."""
    R, L = kept.shape
    before = torch.cumsum(kept, dim=1) - kept.long()  # kept patches left of l
    pos = torch.arange(L, dtype=torch.int64, device=kept.device)
    restore = torch.where(kept, before, K + pos - before)
    keep = kept.nonzero()[:, 1].reshape(R, K)  # row-major nonzero: ascending within a row
    return Masks(keep.reshape(V, N, K), restore.reshape(V, N, L), (~kept).reshape(V, N, L))


# ------------------------------------------------------------------------- block-wise extra
_BLOCK_DOMAIN = 0x80000000  # counter word 0 of block candidates: disjoint from uniform draws
_TOPUP_DOMAIN = 0xC0000000  # counter word 0 of the top-up keys


def block_masks(batch_size, grid, mask_ratio, *, views=1, seed, step=0, sample_ids=None,
                device="cpu", min_block=16, max_block=None, max_aspect=10 / 3,
                attempts=None) -> Masks:
    """BEiT-style block-wise masks with an exact budget, in the `random_masks` output format.

    Rectangles of min_block..max_block patches (height uniform, aspect within 1/max_aspect..
    max_aspect) are added in a row's candidate order while they add new patches and stay within
    the L - K budget (BEiT's rule); the shortfall is then removed uniformly among the remaining
    patches, so every row removes exactly L - K patches and batches stay rectangular. Candidates
    come from the same Philox key as `random_masks` (a disjoint counter range), all in integer
    arithmetic: the masks depend on (seed, step, sample id, view) only, on any device.
    Pure torch (no compiled kernel): a cheap extra; uniform `random_masks` stays the default.
    """
    if isinstance(grid, int):
        grid = (grid, grid)
    H = _as_int("grid[0]", grid[0], 1, 2**12, "pass the patch grid as int or (H, W)")
    W = _as_int("grid[1]", grid[1], 1, 2**12, "pass the patch grid as int or (H, W)")
    N, L, V, seed, step, K, dev, ids = _validate(batch_size, H * W, mask_ratio, views, seed, step,
                                                 sample_ids, device)
    target = L - K
    hi = target if max_block is None else _as_int("max_block", max_block, 1, L, "at most L")
    lo = min(_as_int("min_block", min_block, 1, _MAX_L, "at least 1 patch"), max(hi, 1))
    from fractions import Fraction
    if not float(max_aspect) >= 1.0:
        raise ValueError(f"block_masks: max_aspect must be >= 1, got {max_aspect}")
    asp = Fraction(float(max_aspect)).limit_denominator(1000)
    T = 10 * (-(-target // lo)) + 10 if attempts is None else _as_int(
        "attempts", attempts, 0, 2**16, "candidates per row")
    R = V * N
    s = _TorchStream(ids, V, seed, step, 0)
    c0 = _BLOCK_DOMAIN + torch.arange(T, dtype=torch.int64, device=dev)
    u0, u1, u2, u3 = philox4x32_10(c0, s.c1[:, None], s.c2[:, None], s.c3, s.k0, s.k1)  # [R, T]
    area = lo + ((u0 * (hi - lo + 1)) >> 32)
    h = 1 + ((u1 * torch.clamp(area, max=H)) >> 32)
    w = (area + h // 2) // h
    valid = (w >= 1) & (w <= W) & (w * asp.denominator <= h * asp.numerator) & (
        h * asp.denominator <= w * asp.numerator)
    w = w.clamp(1, W)
    top = (u2 * (H - h + 1)) >> 32
    left = (u3 * (W - w + 1)) >> 32
    rr = torch.arange(H, device=dev)[None, :, None]
    cc = torch.arange(W, device=dev)[None, None, :]
    mask = torch.zeros(R, L, dtype=torch.bool, device=dev)
    count = torch.zeros(R, dtype=torch.int64, device=dev)
    for t in range(T):
        tp, lf = top[:, t, None, None], left[:, t, None, None]
        blk = ((rr >= tp) & (rr < tp + h[:, t, None, None]) & (cc >= lf)
               & (cc < lf + w[:, t, None, None])).reshape(R, L)
        new = blk & ~mask
        n_new = new.sum(1)
        ok = valid[:, t] & (n_new > 0) & (count + n_new <= target)
        mask |= new & ok[:, None]
        count += n_new * ok
    # Top-up: the shortfall goes to the unmasked patches with the smallest Philox keys.
    nb = (L + 3) // 4
    c0 = _TOPUP_DOMAIN + torch.arange(nb, dtype=torch.int64, device=dev)
    keys = torch.stack(philox4x32_10(c0, s.c1[:, None], s.c2[:, None], s.c3, s.k0, s.k1), 2)
    keys = keys.reshape(R, 4 * nb)[:, :L].masked_fill(mask, 2**32)
    pos = torch.arange(L, dtype=torch.int64, device=dev)
    order = torch.argsort(keys * L + pos, dim=1)  # unique keys: no tie to break
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(R, L))
    mask |= rank < (target - count)[:, None]
    return _emit(~mask, K, V, N)
