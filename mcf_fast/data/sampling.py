"""Deterministic epoch order, rank/worker split and per-sample augmentation randomness.

Everything here is a pure function of integers (seed, epoch, sample id, ...), never of process,
thread, worker count or wall clock, so two runs (or a run and its resume) see the same samples in the
same order with the same flips.

Order of one epoch (`EpochOrder`): the shards (or pseudo-shards of consecutive ids for folders, list
files and synthetic data) are permuted with (seed, epoch); consecutive shards of that order are
grouped until a group holds `window` samples; samples are permuted inside each group with
(seed, epoch, group). A window >= the data set gives a full random permutation; a smaller one keeps
reads local to a few shards at a time (what 20M-sample shard sets need).

Split: ranks interleave by step: step b covers epoch positions [b*B*W, (b+1)*B*W) and rank r takes
the r-th B of them (`step_start`). Every rank runs the same number of steps (no rank waits on a
collective another never reaches), and a step's global batch is the same samples at any world size
with the same global batch, so runs resume at another world size and 2 x B/2 equals 1 x B.
DataLoader workers take whole steps round-robin, and the
loader hands steps back in step order, so the worker count changes speed, not content.
"""
from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic is what we want here)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_u64(*keys) -> np.ndarray:
    """Chain-hash integer keys (scalars or broadcastable int arrays) into uint64."""
    h = np.zeros((), dtype=np.uint64)
    for k in keys:
        k = np.asarray(k).astype(np.int64).astype(np.uint64)
        h = _splitmix(h ^ k)
    return h


def uniform(*keys) -> np.ndarray:
    """Float64 in [0, 1) from integer keys (53 random bits)."""
    return (hash_u64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Salts keep the streams apart: a flip bit must not correlate with a crop position.
SALT_FLIP, SALT_RRC, SALT_SHARDS, SALT_GROUP, SALT_RETRY = 0xF11B, 0xC209, 0x5A4D, 0x6209, 0x2E72


def flip_flags(seed: int, epoch: int, sample_ids) -> np.ndarray:
    """bool [N]: horizontal flip of each sample in this epoch (p = 0.5)."""
    return (hash_u64(SALT_FLIP, seed, epoch, np.asarray(sample_ids)) >> np.uint64(40)) & np.uint64(1) == 1


def rrc_boxes(seed, epoch, sample_ids, heights, widths, scale, ratio):
    """RandomResizedCrop boxes (x0, y0, w, h) as int arrays, one per sample, torchvision's rule:
    10 tries of (area fraction, log-ratio); the first that fits wins, else the central crop."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    out = np.zeros((len(ids), 4), dtype=np.int64)
    log_r = np.log(ratio)
    for i in range(len(ids)):
        area = float(H[i] * W[i])
        tries = uniform(SALT_RRC, seed, epoch, ids[i], np.arange(40)).reshape(10, 4)
        for u in tries:
            target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
            ar = float(np.exp(log_r[0] + u[1] * (log_r[1] - log_r[0])))
            w = int(round((target * ar) ** 0.5))
            h = int(round((target / ar) ** 0.5))
            if 0 < w <= W[i] and 0 < h <= H[i]:
                out[i] = (int(u[2] * (W[i] - w + 1)), int(u[3] * (H[i] - h + 1)), w, h)
                break
        else:
            s = int(min(H[i], W[i]))
            out[i] = ((W[i] - s) // 2, (H[i] - s) // 2, s, s)
    return out


PSEUDO_SHARD = 4096  # folders/lists/LMDB/synthetic: consecutive ids grouped like shards for the order


def pseudo_counts(n: int) -> np.ndarray:
    """Samples per pseudo-shard of a source of n samples without shards (the last one may be short)."""
    c = [PSEUDO_SHARD] * (n // PSEUDO_SHARD) + ([n % PSEUDO_SHARD] if n % PSEUDO_SHARD else [])
    return np.asarray(c or [0], dtype=np.int64)


class EpochOrder:
    """Position -> global sample id for each epoch; see the module docstring for the rule."""

    def __init__(self, counts, seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.total = int(self.counts.sum())
        self.seed = int(seed)
        self.window = max(1, int(window))
        self._group_cache: dict = {}
        self._ids_cache: dict = {}

    def _groups(self, epoch: int):
        """(shard order, group boundaries in positions, shard index ranges per group)."""
        if epoch in self._group_cache:
            return self._group_cache[epoch]
        rng = np.random.Generator(np.random.PCG64(int(hash_u64(SALT_SHARDS, self.seed, epoch))))
        order = rng.permutation(len(self.counts))
        c = self.counts[order]
        bounds, shard_cuts, acc = [0], [0], 0
        for i, n in enumerate(c):
            acc += int(n)
            if acc - bounds[-1] >= self.window or i == len(c) - 1:
                bounds.append(acc)
                shard_cuts.append(i + 1)
        out = order, np.asarray(bounds, dtype=np.int64), shard_cuts
        self._group_cache = {epoch: out}  # one epoch at a time: 20M-sample orders are not small
        return out

    def _group_ids(self, epoch: int, g: int) -> np.ndarray:
        if (epoch, g) in self._ids_cache:
            return self._ids_cache[(epoch, g)]
        order, _, cuts = self._groups(epoch)
        shards = order[cuts[g]:cuts[g + 1]]
        ids = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.counts[s]) for s in shards]
                             or [np.zeros(0, np.int64)])
        rng = np.random.Generator(np.random.PCG64(int(hash_u64(SALT_GROUP, self.seed, epoch, g))))
        out = ids[rng.permutation(len(ids))]
        if len(self._ids_cache) >= 4:  # a rank's range spans few groups; keep memory bounded
            self._ids_cache.pop(next(iter(self._ids_cache)))
        self._ids_cache[(epoch, g)] = out
        return out

    def ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global sample ids at positions [start, stop) of the epoch; positions wrap modulo total."""
        if self.total == 0:
            raise ValueError("the data set holds no samples: nothing to iterate over "
                             "(check data.path and the scan report)")
        pos = np.arange(start, stop, dtype=np.int64) % self.total
        _, bounds, _ = self._groups(epoch)
        g_of = np.searchsorted(bounds, pos, side="right") - 1
        out = np.empty(len(pos), dtype=np.int64)
        for g in np.unique(g_of):
            sel = g_of == g
            out[sel] = self._group_ids(epoch, int(g))[pos[sel] - bounds[g]]
        return out


def step_start(step: int, batch_size: int, rank: int, world_size: int) -> int:
    """First epoch position of rank `rank`'s batch at `step`. Ranks interleave by step (step b covers
    positions [b*B*W, (b+1)*B*W), rank r the r-th B of them), so the global batch of a step is the
    same samples at any world size with the same global batch: a run can resume at another world size
    and 2 ranks x B/2 see exactly what 1 rank x B sees."""
    return (step * world_size + rank) * batch_size


def per_rank(total: int, batch_size: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """(samples per rank P, steps per epoch). drop_last: the epoch tail that does not fill a full step
    on every rank is dropped; otherwise positions wrap around (a few samples repeat) so every rank
    still runs the same number of full steps."""
    if drop_last:
        steps = total // (world_size * batch_size)
        if steps == 0:
            raise ValueError(
                f"{total} samples cannot fill one step of batch {batch_size} on {world_size} rank(s) "
                "(full steps only): use more data (--data.path) or a smaller --optim.batch_size")
    else:
        steps = max(1, -(-total // (world_size * batch_size)))
    return steps * batch_size, steps
