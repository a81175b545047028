"""mcf_fast.masking.block_masks: BEiT-style block masks with an exact budget, same output format
and the same per-sample determinism as random_masks; the numbers equal a scalar restatement and come
from exact integer ops only, so every device gives them."""
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mcf_fast import masking as mk

M32 = 0xFFFFFFFF


# ------------------------------------------------- scalar restatement (plain Python ints, no torch)
def _philox_py(ctr, key):
    c, k0, k1 = list(ctr), key[0], key[1]
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return c


def _block_row_py(H, W, K, seed, step, sid, view, lo, hi, aspect, T):
    """Kept patches (ascending) of one row, by the documented rule, written independently of torch."""
    L, asp = H * W, Fraction(aspect).limit_denominator(1000)
    words = [(view << 16) | ((sid >> 32) & 0xFFFF), sid & M32, step & M32]
    key = (seed & M32, seed >> 32)
    removed, budget = set(), L - K
    for t in range(T):
        u0, u1, u2, u3 = _philox_py([0x80000000 + t] + words, key)
        area = lo + ((u0 * (hi - lo + 1)) >> 32)
        h = 1 + ((u1 * min(area, H)) >> 32)
        w = (area + h // 2) // h
        if not (1 <= w <= W and Fraction(1) / asp <= Fraction(h, w) <= asp):
            continue
        top, left = (u2 * (H - h + 1)) >> 32, (u3 * (W - w + 1)) >> 32
        new = {r * W + c for r in range(top, top + h) for c in range(left, left + w)} - removed
        if len(new) <= budget:
            removed |= new
            budget -= len(new)
    keys = {l: _philox_py([0xC0000000 + l // 4] + words, key)[l % 4] for l in range(L) if l not in removed}
    removed |= set(sorted(keys, key=lambda l: (keys[l], l))[:budget])
    return [l for l in range(L) if l not in removed]


def _removed_neighbour_share(mask, H, W):
    """Mean share of a removed patch's 4-neighbours (inside the grid) that are removed too."""
    m = mask.reshape(-1, H, W).float()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1))
    ones = torch.nn.functional.pad(torch.ones_like(m), (1, 1, 1, 1))
    nb = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    deg = ones[:, :-2, 1:-1] + ones[:, 2:, 1:-1] + ones[:, 1:-1, :-2] + ones[:, 1:-1, 2:]
    return float((nb / deg)[m.bool()].mean())


@pytest.mark.parametrize("grid,ratio,kw", [(14, 0.75, {}), (14, 0.4, {}), ((7, 9), 0.5, {}),
                                           (14, 0.75, {"min_block": 4, "max_block": 30}),
                                           (14, 0.6, {"attempts": 0}), (1, 0.0, {})])
def test_exact_budget_and_conventions(grid, ratio, kw):
    """Exactly L - K removed per row; ids_keep ascending; ids_restore = argsort(ids_shuffle)."""
    H, W = (grid, grid) if isinstance(grid, int) else grid
    L = H * W
    K = mk.num_kept(L, ratio)
    m = mk.block_masks(6, grid, ratio, views=2, seed=3, **kw)
    assert m.ids_keep.shape == (2, 6, K) and m.mask.shape == (2, 6, L)
    mask = m.mask.reshape(-1, L)
    assert torch.equal(mask.sum(1), torch.full((12,), L - K))
    keep = m.ids_keep.reshape(-1, K)
    assert bool((keep[:, 1:] > keep[:, :-1]).all())
    removed = mask.nonzero()[:, 1].reshape(12, L - K)
    restore = torch.argsort(torch.cat([keep, removed], 1), dim=1)
    assert torch.equal(restore, m.ids_restore.reshape(-1, L))


def test_blocks_are_contiguous():
    """Removed patches cluster: far more removed neighbours than uniform masks at the same ratio."""
    H = 14
    block = mk.block_masks(256, H, 0.4, seed=1, max_block=40)
    uniform = mk.random_masks(256, H * H, 0.4, seed=1)
    b, u = _removed_neighbour_share(block.mask, H, H), _removed_neighbour_share(uniform.mask, H, H)
    assert u < 0.45 and b > u + 0.3, (b, u)


def test_per_sample_determinism():
    """A row depends on (seed, step, sample id, view) only: batch split, views prefix, steps."""
    ids = torch.arange(50, 70)
    full = mk.block_masks(20, 14, 0.6, views=2, seed=5, step=2, sample_ids=ids)
    part = mk.block_masks(5, 14, 0.6, views=1, seed=5, step=2, sample_ids=ids[10:15])
    assert torch.equal(full.mask[0, 10:15], part.mask[0])
    assert torch.equal(full.ids_keep[0, 10:15], part.ids_keep[0])
    other = mk.block_masks(20, 14, 0.6, views=2, seed=5, step=3, sample_ids=ids)
    assert not torch.equal(full.mask, other.mask)
    assert not torch.equal(full.mask[0], full.mask[1])


def test_top_up_path_fills_budget_uniformly():
    """With no block candidates every removed patch comes from the top-up: still exact, varied."""
    m = mk.block_masks(400, 8, 0.5, seed=2, attempts=0)
    assert torch.equal(m.mask.sum(-1), torch.full((1, 400), 32))
    freq = m.mask[0].float().mean(0)  # each position removed with probability 1/2
    assert float((freq - 0.5).abs().max()) < 0.15


@pytest.mark.parametrize("kw,exc,msg", [
    ({"grid": 0}, ValueError, "grid"), ({"grid": (14, -1)}, ValueError, "grid"),
    ({"max_aspect": 0.5}, ValueError, "max_aspect"), ({"min_block": 0}, ValueError, "min_block"),
    ({"mask_ratio": 1.0}, ValueError, "mask_ratio"), ({"attempts": -1}, ValueError, "attempts"),
])
def test_bad_input(kw, exc, msg):
    """Bad block-mask arguments raise errors that name them."""
    args = {"grid": 14, "mask_ratio": 0.75}
    args.update(kw)
    with pytest.raises(exc, match=msg):
        mk.block_masks(4, args.pop("grid"), args.pop("mask_ratio"), seed=0, **args)


@pytest.mark.parametrize("grid,ratio,kw", [((14, 14), 0.75, {}), ((7, 9), 0.4, {"min_block": 4}),
                                           ((5, 5), 0.5, {"max_aspect": 1.0, "attempts": 7}),
                                           ((6, 4), 0.3, {"min_block": 2, "max_block": 5, "attempts": 3})])
def test_rows_equal_the_scalar_restatement(grid, ratio, kw):
    """Each row equals a plain-Python restatement of the rule: the same Philox counters (domains 2^31
    and 3 * 2^30), the same geometry and greedy budget, the same top-up order."""
    H, W = grid
    L = H * W
    K = mk.num_kept(L, ratio)
    seed, step, sids = 2**64 - 7, 2**32 - 2, [0, 5, 2**48 - 1]
    m = mk.block_masks(3, grid, ratio, views=2, seed=seed, step=step, sample_ids=torch.tensor(sids), **kw)
    hi = kw.get("max_block", L - K)
    lo = min(kw.get("min_block", 16), hi)
    T = kw.get("attempts", 10 * (-(-(L - K) // lo)) + 10)
    for v in range(2):
        for n, sid in enumerate(sids):
            want = _block_row_py(H, W, K, seed, step, sid, v, lo, hi, kw.get("max_aspect", 10 / 3), T)
            assert m.ids_keep[v, n].tolist() == want


def test_batch_composition_does_not_matter():
    """A row depends on (seed, step, sample id, view) only: split and permuted batches give the same rows."""
    gen = mk.MaskGenerator("block", 14, 0.6, seed=8)
    ids = torch.arange(300, 340)
    full = gen(40, step=6, sample_ids=ids, views=3)
    perm = torch.randperm(40)
    shuffled = gen(40, step=6, sample_ids=ids[perm], views=3)
    a, b = gen(13, step=6, sample_ids=ids[:13], views=1), gen(27, step=6, sample_ids=ids[13:], views=3)
    for f, p, x, y in zip(full, shuffled, a, b):
        assert torch.equal(f[:, perm], p)
        assert torch.equal(f[:1, :13], x) and torch.equal(f[:, 13:], y)
    empty = gen(0, step=6, sample_ids=ids[:0], views=2)
    assert [tuple(t.shape) for t in empty] == [(2, 0, 78), (2, 0, 196), (2, 0, 196)]


class _ExactOpsOnly(TorchDispatchMode):
    """Fails on any op that makes a floating-point tensor; keeps the inputs of every sort."""

    def __init__(self):
        super().__init__()
        self.sorted, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                assert not (t.is_floating_point() or t.is_complex()), f"{func} made a {t.dtype} tensor"
        if "sort" in str(func):
            self.sorted.append(args[0].clone())
        return out


@pytest.mark.parametrize("kind", ["block", "uniform"])
def test_torch_path_is_exact_integer_arithmetic(kind):
    """The torch path of every built-in kind makes no float tensor, and the only order-dependent op
    (the top-up argsort) sorts keys unique within each row: its result cannot depend on the device or
    the sort algorithm. Hence a GPU computes the bits this CPU test pins."""
    gen = mk.MaskGenerator(kind, (9, 11), 0.7, seed=3, backend="torch")
    with _ExactOpsOnly() as mode:
        m = gen(6, step=2, views=2)
    assert m.mask.dtype == torch.bool and "aten.mul" in mode.ops  # the mode saw the Philox arithmetic
    assert bool(mode.sorted) == (kind == "block")
    for keys in mode.sorted:
        assert keys.dtype == torch.int64
        assert all(row.unique().numel() == row.numel() for row in keys)


class _NoHostRead(TorchDispatchMode):
    """Fails on any op that reads a tensor's value back to the host (on a GPU: a sync)."""
    BANNED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in self.BANNED, f"host read in block masks: {func}"
        return func(*args, **(kwargs or {}))


def test_block_masks_read_nothing_back():
    """Drawing block masks never reads a value back to the host, so on a GPU the step stays sync-free."""
    gen = mk.MaskGenerator("block", 14, 0.75, seed=0)
    with _NoHostRead():
        m = gen(8, step=1, views=2)
    assert m.mask.shape == (2, 8, 196)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    """Block masks on CUDA are the CPU bits (same integer ops)."""
    ids = torch.arange(64) * 7919 + 3
    for grid, ratio in [(14, 0.75), ((7, 9), 0.4), (28, 0.9)]:
        c = mk.MaskGenerator("block", grid, ratio, seed=2**64 - 1, device="cpu")(64, step=5, sample_ids=ids)
        g = mk.MaskGenerator("block", grid, ratio, seed=2**64 - 1, device="cuda")(64, step=5, sample_ids=ids.cuda())
        for x, y in zip(c, g):
            assert y.is_cuda and torch.equal(x, y.cpu())
