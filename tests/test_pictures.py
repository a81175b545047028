"""Reconstruction pictures of the user's own data (a fixed set chosen once by the seed, saved with the run,
reused on resume), labelled columns, and the run's normalisation recorded in encoder.json for eval."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.data.augment import resize_center
from mcf_fast.train import visualize
from mcf_fast.train.heldout import heldout_faces, pick_images, picture_images


def _folder(path, n=12, bad=2):
    """n RGB PNGs of assorted sizes (some not square) and `bad` files that are not images."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (40, 40) if i % 3 else (36, 52)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(path, f"img{i:02d}.png"))
    for i in range(bad):
        with open(os.path.join(path, f"broken{i}.jpg"), "wb") as f:
            f.write(b"\xff\xd8 not a jpeg")
    return str(path)


def _source(path, size=32):
    cfg = DataConfig(path=path, img_size=size, workers=0)
    return cfg, build_pretrain_loader(cfg, batch_size=2, seed=0).source


def test_pick_is_fixed_by_the_seed_and_passes_over_unreadable_files(tmp_path):
    """The same seed picks the same images (another seed others), every one readable, each resized as
    the loader resizes it (shorter side, centre crop)."""
    cfg, src = _source(_folder(tmp_path / "data", n=12, bad=6))
    a, chosen = pick_images(src, cfg, 0, 8, 32)
    b, again = pick_images(src, cfg, 0, 8, 32)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and chosen == again
    assert [c["id"] for c in pick_images(src, cfg, 1, 8, 32)[1]] != [c["id"] for c in chosen]
    assert all(c["key"].endswith(".png") for c in chosen)
    first = np.asarray(Image.open(chosen[0]["key"]).convert("RGB"))
    assert np.array_equal(a[0], resize_center(first, 32))


def test_picture_set_is_saved_once_and_reused(tmp_path):
    """The first call saves the set (PNG strip + JSON naming the images); later calls read it back bit for
    bit, even with the data gone; without --data.path the set is the synthetic held-out faces."""
    data = _folder(tmp_path / "data")
    cfg, src = _source(data)
    out = str(tmp_path / "run")
    first = picture_images(out, cfg, 32, 0, src)
    info = json.load(open(os.path.join(out, "images", "fixed_set.json")))
    assert first.shape == (8, 3, 32, 32) and info["seed"] == 0 and len(info["images"]) == 8
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    assert torch.equal(picture_images(out, cfg, 32, 0, None), first)
    synth = DataConfig(path="", img_size=32)
    assert torch.equal(picture_images(out, synth, 32, 5, None), heldout_faces(5, 8, 32, synth.mean, synth.std))


def test_a_damaged_or_foreign_saved_set_is_picked_again(tmp_path):
    """A fixed_set.png that is not a PNG, or a strip of another image size, is not trusted: the set is
    picked again by the seed (the same images) and saved over it."""
    cfg, src = _source(_folder(tmp_path / "data"))
    out = str(tmp_path / "run")
    first = picture_images(out, cfg, 32, 0, src)
    png = os.path.join(out, "images", "fixed_set.png")
    for bad in (b"\x89PNG truncated", None):
        if bad is None:
            Image.new("RGB", (48 * 2, 48)).save(png)  # another size's strip
        else:
            open(png, "wb").write(bad)
        assert torch.equal(picture_images(out, cfg, 32, 0, src), first)
        assert np.asarray(Image.open(png)).shape == (32, 8 * 32, 3)


def test_columns_are_labelled():
    """The picture gains a header (text in each of the four columns) above the grid, which is enlarged by
    a whole factor and otherwise unchanged."""
    grid = np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8)  # 2 rows of 32-px tiles
    out = visualize.labelled(grid, 32)
    head = visualize.header(96)
    assert np.array_equal(out[:head.shape[0]], head)
    assert np.array_equal(out[head.shape[0]:], grid.repeat(3, 0).repeat(3, 1))
    for k in range(4):
        assert (head[:, k * 96:(k + 1) * 96] < 100).any(), f"column {k} has no label"


def test_a_run_on_a_folder_pictures_its_images_and_exports_its_normalisation(tmp_path):
    """Training on a folder with its own mean/std: the pictures' first column is the saved set of that
    folder's images, encoder.json records the run's mean/std, eval reads them back, and converting the
    run's checkpoint records them too."""
    from test_pretrain_e2e import TINY

    from mcf_fast.convert import convert
    from mcf_fast.eval.encoders import build_encoder
    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import train
    data, out = _folder(tmp_path / "data"), tmp_path / "run"
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    cfg, _ = parse_args(["--out", str(out), "--max-steps", "2", *TINY, "--data.path", data, "--data.workers", "0",
                         "--data.mean", ",".join(map(str, mean)), "--data.std", ",".join(map(str, std)),
                         "--run.vis_every", "1", "--run.tensorboard", "false"])
    train(cfg)
    saved = np.asarray(Image.open(out / "images" / "fixed_set.png"))            # [32, 8 * 32, 3]
    tiles = saved.reshape(32, 8, 32, 3).transpose(1, 0, 2, 3)
    grid = np.asarray(Image.open(out / "images" / "recon_latest.png"))
    body = grid[visualize.header(96).shape[0]:]
    originals = body[:, :96].reshape(8, 96, 96, 3)[:, ::3, ::3]                  # column 0, back to 32 px
    assert np.abs(originals.astype(int) - tiles.astype(int)).max() <= 1          # normalised and back: rounding
    meta = json.load(open(out / "encoder.json"))
    assert meta["norm_mean"] == pytest.approx(mean) and meta["norm_std"] == pytest.approx(std)
    _, info = build_encoder(str(out), None, None, 0)
    assert info["norm_mean"] == pytest.approx(mean) and info["norm_std"] == pytest.approx(std)
    convert(str(out), encoder_dir=str(tmp_path / "converted"))
    again = json.load(open(tmp_path / "converted" / "encoder.json"))
    assert again["norm_mean"] == pytest.approx(mean) and again["norm_std"] == pytest.approx(std)


def test_save_encoder_refuses_a_bad_normalisation(tmp_path):
    """A std of 0 or a 2-channel mean is refused by name before anything is written."""
    from mcf_fast.model.vit import VisionTransformer, save_encoder
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="std must be 3 finite numbers > 0"):
        save_encoder(vit, str(tmp_path / "a"), std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        save_encoder(vit, str(tmp_path / "b"), mean=(0.5, 0.5))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
