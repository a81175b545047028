"""DALI backend (CPU here, device_id=None): same order, augmentation and resume as the torch loader."""
import pytest
import torch

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.data.synthetic import main as synth_main

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Validated synthetic shards (the wds writer indexes them and writes the manifest)."""
    out = tmp_path_factory.mktemp("wds")
    synth_main(["--out", str(out), "--num", "24", "--size", "48", "--format", "wds", "--shard-size", "10"])
    return str(out / "faces-{000000..000002}.tar")


def _run(path, backend, n, **kw):
    cfg = DataConfig(path=path, img_size=32, workers=1, loader=backend, **kw)
    loader = build_pretrain_loader(cfg, batch_size=4, seed=5)
    assert loader.backend == backend
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


@pytest.mark.parametrize("rrc", [False, True])
def test_dali_matches_torch_loader(shards, rrc):
    """Same ids in the same order; pixels equal up to the resize filter (flip and crop box identical)."""
    d, t = _run(shards, "dali", 6, random_resized_crop=rrc), _run(shards, "torch", 6, random_resized_crop=rrc)
    for x, y in zip(d, t):
        assert torch.equal(x.sample_ids, y.sample_ids)
        assert x.images.shape == y.images.shape == (4, 3, 32, 32)
        err = (x.images - y.images).abs().mean(dim=(1, 2, 3))
        assert err.max() < 0.05, err  # a mirrored or shifted image is ~0.5-1.0 away
        assert err.max() < (x.images - y.images.flip(-1)).abs().mean(dim=(1, 2, 3)).min()


def test_dali_resume_is_exact(shards):
    """DALI: after load_state_dict the next batches are bit-identical to the uninterrupted run's."""
    cfg = DataConfig(path=shards, img_size=32, workers=1, loader="dali")
    a = build_pretrain_loader(cfg, batch_size=4, seed=5)
    for _ in range(7):  # past the epoch boundary (6 steps per epoch)
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = build_pretrain_loader(cfg, batch_size=4, seed=5)
    b.load_state_dict(state)
    got = [next(b) for _ in range(3)]
    assert all(torch.equal(x.images, y.images) and torch.equal(x.sample_ids, y.sample_ids) for x, y in zip(want, got))


def test_dali_two_ranks_cover_the_epoch_once(shards):
    """2 ranks on DALI: each sample once per epoch, equal steps."""
    ids, steps = [], []
    for rank in range(2):
        cfg = DataConfig(path=shards, img_size=32, workers=1, loader="dali")
        loader = build_pretrain_loader(cfg, batch_size=4, rank=rank, world_size=2, seed=1)
        steps.append(loader.steps_per_epoch)
        ids += torch.cat([next(loader).sample_ids for _ in range(loader.steps_per_epoch)]).tolist()
        loader.close()
    assert steps == [3, 3] and len(set(ids)) == len(ids) == 24


def test_auto_picks_dali_only_where_it_is_faster(shards):
    """loader=auto: DALI for validated shards on CUDA; torch on a CPU device or for synthetic data."""
    from mcf_fast.data.dali import unavailable_reason
    from mcf_fast.data.sources import open_source
    src = open_source(shards, seed=0, img_size=32, synthetic_size=1, cache_mb=0)
    assert unavailable_reason(DataConfig(path=shards), src, "cuda:0", auto=True) is None
    assert "CPU" in unavailable_reason(DataConfig(path=shards), src, "cpu", auto=True)
    assert build_pretrain_loader(DataConfig(path=shards, img_size=32), batch_size=4).backend == "torch"
    assert build_pretrain_loader(DataConfig(img_size=32, synthetic_size=8), batch_size=4).backend == "torch"
    with pytest.raises(ValueError, match="synthetic"):
        build_pretrain_loader(DataConfig(img_size=32, synthetic_size=8, loader="dali"), batch_size=4)


def test_dali_float16_output(shards):
    """dtype=float16 comes out of crop_mirror_normalize directly."""
    b = _run(shards, "dali", 1, dtype="float16")[0]
    assert b.images.dtype == torch.float16 and torch.isfinite(b.images).all()
