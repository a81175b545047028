"""mcf_fast.masking.block_masks: BEiT-style block masks with an exact budget, same output format
and the same per-sample determinism as random_masks."""
import pytest
import torch

from mcf_fast import masking as mk


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
