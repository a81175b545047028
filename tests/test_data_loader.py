"""build_pretrain_loader: config checks, determinism, exact resume, rank/worker splits (synthetic mode)."""
import dataclasses

import numpy as np
import pytest
import torch

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.data.config import help_texts
from mcf_fast.data.sampling import EpochOrder, flip_flags, per_rank


def _cfg(**kw):
    base = dict(img_size=32, synthetic_size=96, workers=0, synthetic_cache_mb=16)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    return [b.images.clone() for b in out], [b.sample_ids.clone() for b in out]


def test_every_field_has_help_and_defaults_validate():
    """Each DataConfig field documents itself and the defaults pass validate()."""
    assert all(len(h) > 10 for h in help_texts().values())
    assert DataConfig().validate() is not None


@pytest.mark.parametrize("field,value,needle", [
    ("loader", "fast", "loader"), ("img_size", 4, "img_size"), ("workers", -1, "workers"),
    ("rrc_scale", (0.5, 0.2), "rrc_scale"), ("std", (1.0, 0.0, 1.0), "std"), ("decoder", "magic", "decoder"),
    ("dtype", "int8", "dtype")])
def test_validate_names_the_bad_field(field, value, needle):
    """validate() raises ValueError naming the offending field."""
    cfg = dataclasses.replace(DataConfig(), **{field: value})
    with pytest.raises(ValueError, match=needle):
        cfg.validate()


def test_batch_contract_shapes_dtypes_and_normalisation():
    """Batches are [N,3,S,S] float normalised with int64 global ids inside [0, synthetic_size)."""
    loader = build_pretrain_loader(_cfg(), batch_size=8, seed=3)
    b = next(loader)
    assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.sample_ids.dtype == torch.int64 and b.sample_ids.min() >= 0 and b.sample_ids.max() < 96
    # normalised: (0 - mean) / std <= x <= (1 - mean) / std per channel
    lo = (0 - torch.tensor(DataConfig().mean)) / torch.tensor(DataConfig().std)
    hi = (1 - torch.tensor(DataConfig().mean)) / torch.tensor(DataConfig().std)
    assert (b.images.amin((0, 2, 3)) >= lo - 1e-5).all() and (b.images.amax((0, 2, 3)) <= hi + 1e-5).all()
    assert loader.steps_per_epoch == 96 // 8
    loader.close()


def test_same_seed_same_batches_other_seed_differs():
    """Order and pixels are a pure function of the seed."""
    a = _take(build_pretrain_loader(_cfg(), batch_size=8, seed=5), 3)
    b = _take(build_pretrain_loader(_cfg(), batch_size=8, seed=5), 3)
    c = _take(build_pretrain_loader(_cfg(), batch_size=8, seed=6), 3)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[1], c[1]))


@pytest.mark.parametrize("stop_after", [5, 12, 13])  # mid-epoch, at the epoch boundary, just past it
def test_resume_continues_exactly(stop_after):
    """After load_state_dict the next batches equal those of an uninterrupted run (pixels included)."""
    ref = build_pretrain_loader(_cfg(), batch_size=8, seed=1)
    _take(ref, stop_after)
    state = ref.state_dict()
    want = _take(ref, 6)
    resumed = build_pretrain_loader(_cfg(), batch_size=8, seed=1)
    resumed.load_state_dict(state)
    got = _take(resumed, 6)
    assert all(torch.equal(x, y) for x, y in zip(want[0] + want[1], got[0] + got[1]))


def test_resume_refuses_mismatched_setup():
    """A state from another seed, or at a position that is no step of the new global batch, is refused."""
    first = build_pretrain_loader(_cfg(), batch_size=8, seed=1)
    _take(first, 3)
    state = first.state_dict()  # epoch position 24
    with pytest.raises(ValueError, match="seed"):
        build_pretrain_loader(_cfg(), batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a step boundary"):
        build_pretrain_loader(_cfg(), batch_size=16, seed=1).load_state_dict(state)


def test_ranks_interleave_so_global_batches_match_any_world_size():
    """Step b's global batch is the same samples for 1 rank x 8, 2 ranks x 4 and 4 ranks x 2, and a state
    saved at one world size resumes at another on the same samples."""
    one = torch.cat(_take(build_pretrain_loader(_cfg(), batch_size=8, seed=3), 5)[1])
    for world in (2, 4):
        ranks = [_take(build_pretrain_loader(_cfg(), batch_size=8 // world, rank=r, world_size=world, seed=3), 5)[1]
                 for r in range(world)]
        merged = torch.cat([torch.cat([ranks[r][b] for r in range(world)]) for b in range(5)])
        assert torch.equal(merged, one)
    two = [build_pretrain_loader(_cfg(), batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    for ld in two:
        _take(ld, 2)
    resumed = build_pretrain_loader(_cfg(), batch_size=8, seed=3)
    resumed.load_state_dict(two[0].state_dict())
    assert torch.equal(torch.cat(_take(resumed, 3)[1]), one[16:40])


def test_each_epoch_is_a_permutation_and_epochs_differ():
    """One epoch visits every sample once (drop_last with divisible sizes); the next epoch reorders."""
    loader = build_pretrain_loader(_cfg(), batch_size=8, seed=2)
    e0 = torch.cat(_take(loader, 12)[1])
    e1 = torch.cat(_take(loader, 12)[1])
    assert sorted(e0.tolist()) == list(range(96)) == sorted(e1.tolist())
    assert not torch.equal(e0, e1)


def test_flip_depends_only_on_seed_epoch_sample():
    """A sample seen in two epochs is mirrored exactly when flip_flags says so."""
    loader = build_pretrain_loader(_cfg(), batch_size=8, seed=4)
    seen = {}
    for epoch in range(2):
        imgs, ids = _take(loader, 12)
        for x, i in zip(torch.cat(imgs), torch.cat(ids).tolist()):
            seen.setdefault(i, []).append((epoch, x))
    checked = 0
    for i, ((e0, x0), (e1, x1)) in seen.items():
        f0, f1 = flip_flags(4, e0, [i])[0], flip_flags(4, e1, [i])[0]
        assert torch.equal(x0, x1 if f0 == f1 else x1.flip(-1))
        checked += f0 != f1
    assert checked > 10  # both cases occur


def test_two_ranks_two_workers_see_every_sample_once():
    """2 ranks x 2 DataLoader workers: each sample exactly once per epoch, equal step counts."""
    cfg = _cfg(workers=2, synthetic_size=64)
    ids, steps = [], []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, batch_size=8, rank=rank, world_size=2, seed=7)
        steps.append(loader.steps_per_epoch)
        ids += torch.cat(_take(loader, loader.steps_per_epoch)[1]).tolist()
        loader.close()
    assert steps == [4, 4]
    assert sorted(ids) == list(range(64))


def test_worker_count_does_not_change_content():
    """0 and 2 workers produce identical batches."""
    a = _take(build_pretrain_loader(_cfg(workers=0), batch_size=8, seed=9), 3)
    b = _take(build_pretrain_loader(_cfg(workers=2), batch_size=8, seed=9), 3)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("total,world,batch", [(103, 2, 8), (7, 3, 2), (1000, 4, 32)])
def test_uneven_sizes_give_equal_steps(total, world, batch):
    """drop_last=False pads by wrapping so all ranks run ceil(total / (world * batch)) steps."""
    p, steps = per_rank(total, batch, world, drop_last=False)
    assert steps == -(-total // (world * batch)) and p == steps * batch
    order = EpochOrder([total], seed=0, window=1 << 20)
    seen = np.concatenate([order.ids(0, r * p, (r + 1) * p) for r in range(world)])
    assert set(seen.tolist()) == set(range(total))  # nothing lost, only the wrap repeats


def test_windowed_order_is_a_permutation_and_stays_local():
    """With a window of 2 shards, every id appears once and each window spans <= 2 shards."""
    counts = [10, 0, 7, 13, 10, 5]
    order = EpochOrder(counts, seed=1, window=17)
    ids = order.ids(3, 0, sum(counts))
    assert sorted(ids.tolist()) == list(range(sum(counts)))
    starts = np.cumsum([0] + counts[:-1])
    shard = np.searchsorted(starts, ids, side="right") - 1
    assert len(set(shard[:17].tolist())) <= 2


@pytest.mark.parametrize("side,size", [(256, 224), (224, 224), (100, 160), (40, 32)])
@pytest.mark.parametrize("flip", [False, True])
def test_fused_opencv_path_equals_the_plain_steps(side, size, flip):
    """fast_square (one cv2 call) = resize_center + to_chw (+ normalise): uint8 exactly, float to 1e-6."""
    from mcf_fast.data import augment
    if augment.fast_square(np.zeros((8, 8, 3), np.uint8), 8, False) is None:
        pytest.skip("this OpenCV has no dnn.blobFromImageWithParams")
    img = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    mean, std = DataConfig().mean, DataConfig().std
    chw = augment.to_chw(augment.resize_center(img, size), flip)
    assert np.array_equal(augment.fast_square(img, size, flip), chw)
    np.testing.assert_allclose(augment.fast_square(img, size, flip, mean, std),
                               augment.normalize_np(chw, mean, std), atol=1e-6, rtol=0)


def test_fused_path_declines_what_it_would_change():
    """Non-square images and strong shrinking (area filter) take the plain path."""
    from mcf_fast.data import augment
    assert augment.fast_square(np.zeros((30, 40, 3), np.uint8), 24, False) is None
    assert augment.fast_square(np.zeros((512, 512, 3), np.uint8), 224, False) is None
