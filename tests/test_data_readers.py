"""Readers (shards, folders, list files), bad data on both loaders, and scan."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.data.scan import main as scan_main
from mcf_fast.data.scan import scan
from mcf_fast.data.sources import open_source

RNG = np.random.default_rng(0)


def _enc(img, fmt="JPEG", **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _rgb(h=40, w=48):
    """A smooth random image (a 4x4 grid upsampled), so different resize filters agree closely."""
    grid = Image.fromarray(RNG.integers(0, 255, (4, 4, 3), dtype=np.uint8))
    return grid.resize((w, h), Image.BILINEAR)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


GOOD = 10
BAD = {  # key -> (members, skip reason)
    "trunc": ([("trunc.jpg", _enc(_rgb())[:300])], "corrupt"),
    "text": ([("text.jpg", b"this is not an image at all" * 4)], "not_image"),
    "tiny": ([("tiny.jpg", _enc(_rgb(1, 1)))], "too_small"),
    "noimg": ([("noimg.json", b"{}"), ("noimg.txt", b"caption")], "missing_image"),
}
CONVERTED = {
    "gray": ("gray.jpg", _enc(_rgb().convert("L"))),
    "cmyk": ("cmyk.jpg", _enc(_rgb().convert("CMYK"))),
    "rgba": ("rgba.png", _enc(_rgb().convert("RGBA"), "PNG")),
    "16bit": ("deep.png", _enc(Image.fromarray(np.asarray(_rgb())[..., 0].astype(np.uint16) * 257), "PNG")),
}


@pytest.fixture
def bad_shards(tmp_path):
    """Two real shards (good + every bad/odd kind), one empty shard, one missing from the pattern."""
    good = [m for i in range(GOOD) for m in ((f"g{i:03d}.jpg", _enc(_rgb())), (f"g{i:03d}.json", b"{}"))]
    bad = [m for members, _ in BAD.values() for m in members]
    _tar(tmp_path / "s-000000.tar", good[:12] + bad)
    _tar(tmp_path / "s-000001.tar", good[12:] + list(CONVERTED.values()))
    _tar(tmp_path / "s-000002.tar", [])
    return str(tmp_path / "s-{000000..000003}.tar")


def _epoch(loader):
    return [next(loader) for _ in range(loader.steps_per_epoch)]


def test_torch_loader_skips_and_counts_every_bad_kind(bad_shards):
    """Corrupt/non-image/1x1/no-image samples are skipped, empty+missing shards counted, odd modes converted."""
    cfg = DataConfig(path=bad_shards, img_size=32, workers=0, loader="torch")
    loader = build_pretrain_loader(cfg, batch_size=4, seed=0, drop_last=False)  # meet every sample
    n_total = GOOD + len(BAD) + len(CONVERTED)
    assert loader.num_samples == n_total  # samples without an image stay indexed: counted when met
    batches = _epoch(loader)
    assert all(b.images.shape == (4, 3, 32, 32) and torch.isfinite(b.images).all() for b in batches)
    st = loader.stats()
    by = st["skipped_by_reason"]
    for members, reason in BAD.values():
        assert by.get(reason, 0) >= 1, (reason, by)
    assert by["missing_shard"] == 1 and by["empty_shard"] == 1
    assert set(st["converted_by_reason"]) == set(CONVERTED)
    # the ids handed out are never those of bad samples (substitutes replaced them)
    src = open_source(bad_shards, seed=0, img_size=32, synthetic_size=1, cache_mb=0)
    bad_keys = {os.path.basename(k) for k in BAD}
    used = torch.cat([b.sample_ids for b in batches]).tolist()
    assert not {src.entry(i)[1] for i in used} & bad_keys


def test_torch_loader_bad_data_on_two_workers_matches_zero_workers(bad_shards):
    """Substitution of bad samples is deterministic: 0 and 2 workers give the same batches and counts."""
    outs = []
    for w in (0, 2):
        loader = build_pretrain_loader(DataConfig(path=bad_shards, img_size=32, workers=w, loader="torch"),
                                       batch_size=4, seed=1)
        outs.append((_epoch(loader), loader.stats()["skipped_by_reason"]))
        loader.close()
    (a, sa), (b, sb) = outs
    assert sa == sb
    assert all(torch.equal(x.images, y.images) and torch.equal(x.sample_ids, y.sample_ids) for x, y in zip(a, b))


def test_scan_reports_bad_samples_and_exits_1(bad_shards, capsys):
    """scan lists every bad kind and exits 1; a clean set exits 0."""
    rep = scan(bad_shards, workers=1)
    assert rep["ok"] == GOOD + len(CONVERTED)
    assert {r for _, r in BAD.values()} | {"missing_shard", "empty_shard"} == set(rep["skipped"])
    assert set(rep["converted"]) == set(CONVERTED)
    assert scan_main([bad_shards, "--workers", "1"]) == 1
    assert "missing_image" in capsys.readouterr().out
    clean = os.path.join(os.path.dirname(bad_shards), "s-000000.tar")
    _tar(clean, [(f"c{i}.jpg", _enc(_rgb())) for i in range(3)])
    assert scan_main([clean, "--workers", "1"]) == 0


def test_dali_refuses_unvalidated_shards_with_the_fix(bad_shards):
    """DALI never reads shards that scan/prepare did not validate, and says which command fixes it."""
    pytest.importorskip("nvidia.dali")
    with pytest.raises(ValueError, match="scan --write-index"):
        build_pretrain_loader(DataConfig(path=bad_shards, img_size=32, loader="dali"), batch_size=4)


def test_dali_reads_validated_shards_with_bad_samples_left_out(bad_shards):
    """After scan --write-index, DALI (CPU) and torch see the same good samples; the counts report the rest."""
    pytest.importorskip("nvidia.dali")
    assert scan_main([bad_shards, "--workers", "1", "--write-index"]) == 1  # still reports what it dropped
    results = {}
    for backend in ("dali", "torch"):
        cfg = DataConfig(path=bad_shards, img_size=32, workers=1, loader=backend, hflip=True)
        loader = build_pretrain_loader(cfg, batch_size=2, seed=3)
        assert loader.backend == backend and loader.num_samples == GOOD + len(CONVERTED)
        results[backend] = (_epoch(loader), loader.stats())
        loader.close()
    (d, dst), (t, tst) = results["dali"], results["torch"]
    for x, y in zip(d, t):
        assert torch.equal(x.sample_ids, y.sample_ids)
        # DALI's and cv2's resize filters differ slightly: close, not equal (0.05 normalised ~ 3 grey levels)
        assert (x.images - y.images).abs().mean(dim=(1, 2, 3)).max() < 0.05
    for _, reason in BAD.values():
        assert dst["skipped_by_reason"][reason] >= 1 and tst["skipped_by_reason"][reason] >= 1
    assert dst["skipped_by_reason"]["missing_shard"] == 1
    assert set(dst["converted_by_reason"]) == set(CONVERTED)  # from scan's counts: never silent


def test_image_folder_any_depth_and_list_file(tmp_path):
    """Folders are walked recursively in sorted order; list files hold relative paths."""
    for sub in ("a", "b/c", "b/d/e"):
        os.makedirs(tmp_path / "imgs" / sub)
    names = ["a/1.jpg", "b/c/2.png", "b/d/e/3.jpg", "b/d/e/4.JPG"]
    for n in names:
        _rgb().save(tmp_path / "imgs" / n, "PNG" if n.endswith("png") else "JPEG")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path / "imgs"), seed=0, img_size=32, synthetic_size=1, cache_mb=0)
    assert [os.path.relpath(p, tmp_path / "imgs") for p in src.paths] == sorted(names)
    (tmp_path / "list.txt").write_text("\n".join("imgs/" + n for n in names[:3]) + "\n")
    loader = build_pretrain_loader(DataConfig(path=str(tmp_path / "list.txt"), img_size=16, workers=0),
                                   batch_size=3, seed=0)
    b = next(loader)
    assert sorted(b.sample_ids.tolist()) == [0, 1, 2] and b.images.shape == (3, 3, 16, 16)


def test_shard_loader_matches_decoded_pixels(tmp_path):
    """A shard sample comes out as resize(decode(jpg)), flipped per flip_flags, normalised."""
    from mcf_fast.data.augment import resize_center
    from mcf_fast.data.sampling import flip_flags
    imgs = [np.asarray(_rgb(32, 32)) for _ in range(4)]
    _tar(tmp_path / "x.tar", [(f"k{i}.png", _enc(Image.fromarray(a), "PNG")) for i, a in enumerate(imgs)])
    cfg = DataConfig(path=str(tmp_path / "x.tar"), img_size=16, workers=0)
    b = next(build_pretrain_loader(cfg, batch_size=4, seed=2))
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    for x, i in zip(b.images, b.sample_ids.tolist()):
        ref = torch.from_numpy(resize_center(imgs[i], 16).transpose(2, 0, 1).copy()).float() / 255
        ref = (ref - mean) / std
        if flip_flags(2, 0, [i])[0]:
            ref = ref.flip(-1)
        assert torch.allclose(x, ref, atol=1e-5)


def test_remote_and_missing_paths_are_refused_clearly(tmp_path):
    """pipe:/URLs and nonexistent paths get an error naming the problem."""
    with pytest.raises(ValueError, match="resume"):
        open_source("pipe:curl -s http://x/a.tar", seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    with pytest.raises(ValueError, match="none of its"):
        open_source(str(tmp_path / "z-{0..3}.tar"), seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    with pytest.raises(ValueError, match="does not exist"):
        open_source(str(tmp_path / "nothing.bin"), seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    (tmp_path / "photo.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a regular file, not a data source"):
        open_source(str(tmp_path / "photo.bin"), seed=0, img_size=8, synthetic_size=1, cache_mb=0)


def test_manifest_marks_validation_and_a_rewritten_shard_loses_it(bad_shards):
    """A validated shard whose size changed is unvalidated again (DALI refuses it)."""
    scan(bad_shards, workers=1, write_index=True)
    folder = os.path.dirname(bad_shards)
    with open(os.path.join(folder, "manifest.json")) as f:
        man = json.load(f)
    assert man["shards"]["s-000000.tar"]["validated_by"] == "scan"
    src = open_source(bad_shards, seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    assert src.all_validated
    with open(os.path.join(folder, "s-000001.tar"), "ab") as f:
        f.write(b"\0" * 512)
    src = open_source(bad_shards, seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    assert not src.all_validated


def test_uneven_shards_two_ranks_two_workers(tmp_path):
    """Shards of 7, 1 and 12 samples on 2 ranks x 2 workers: equal steps, every sample seen, no hang."""
    sizes, k = [7, 1, 12], 0
    for s, n in enumerate(sizes):
        members = []
        for _ in range(n):
            members.append((f"k{k:03d}.jpg", _enc(_rgb(24, 24))))
            k += 1
        _tar(tmp_path / f"u-{s:06d}.tar", members)
    seen, steps = [], []
    for rank in range(2):
        cfg = DataConfig(path=str(tmp_path / "u-{000000..000002}.tar"), img_size=16, workers=2, shuffle_window=8)
        loader = build_pretrain_loader(cfg, batch_size=3, rank=rank, world_size=2, seed=4, drop_last=False)
        steps.append(loader.steps_per_epoch)
        seen += torch.cat([next(loader).sample_ids for _ in range(loader.steps_per_epoch)]).tolist()
        loader.close()
    assert steps == [4, 4]  # ceil(20 / (2 * 3))
    assert set(seen) == set(range(20)) and len(seen) == 24  # 4 wrapped repeats pad the last steps


def test_lmdb_reader_in_the_folder2lmdb_layout(tmp_path):
    """LMDB with __keys__/__len__ and pickled (jpeg, label) values loads; a bad value is skipped and counted."""
    lmdb = pytest.importorskip("lmdb")
    import pickle
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    keys = [f"img{i}".encode() for i in range(6)]
    with env.begin(write=True) as txn:
        for i, k in enumerate(keys):
            val = pickle.dumps((_enc(_rgb(20, 20)), i)) if i != 3 else pickle.dumps(("oops", 3))
            txn.put(k, val)
        txn.put(b"__keys__", pickle.dumps(keys))
        txn.put(b"__len__", pickle.dumps(len(keys)))
    env.close()
    loader = build_pretrain_loader(DataConfig(path=str(tmp_path / "db"), img_size=16, workers=0), batch_size=6,
                                   seed=0)
    b = next(loader)
    assert loader.num_samples == 6 and b.images.shape == (6, 3, 16, 16)
    assert 3 not in b.sample_ids.tolist() and loader.stats()["skipped_by_reason"] == {"not_image": 1}
