"""Downstream readers (real AFLW-19 / LaPa layouts), geometry, sample order, heads and encoders."""
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mcf_fast.eval.datasets import read_aflw19, read_lapa, read_lapa_landmarks
from mcf_fast.eval.encoders import param_groups, parse_arch, resize_encoder
from mcf_fast.eval.heads import DenseModel, heatmap_nll, level_blocks, soft_argmax
from mcf_fast.eval.toydata import write_aflw19, write_lapa
from mcf_fast.eval.transforms import (
    AlignmentData,
    ParsingData,
    StepBatches,
    apply_points,
    box_crop_matrix,
    jitter_matrix,
    warp,
)
from mcf_fast.model.vit import VisionTransformer

MEAN, STD = [0.5] * 3, [0.25] * 3


def _real_size_mat(root, n=24386):
    """An annotation file of the real size (no images): ra reversed, so the split order is checkable."""
    rng = np.random.default_rng(0)
    names = np.empty((n, 1), dtype=object)
    for i in range(n):
        names[i, 0] = np.array([f"0/image{i:05d}.jpg"])
    mask = np.ones((n, 19))
    mask[1::2, 3] = 0
    scipy.io.savemat(os.path.join(root, "AFLWinfo_release.mat"), {
        "bbox": np.tile([0.0, 10.0, 0.0, 10.0], (n, 1)), "data": rng.uniform(0, 10, (n, 38)),
        "mask_new": mask, "nameList": names, "ra": np.arange(n, 0, -1, dtype=np.float64)[None]})


def test_aflw_real_rule_split(tmp_path):
    """24,386 faces: train = first 20,000 of ra (1-based), test = the rest, frontal = all 19 visible."""
    _real_size_mat(tmp_path)
    train = read_aflw19(str(tmp_path), "train", check_images=False)
    test = read_aflw19(str(tmp_path), "test", check_images=False)
    frontal = read_aflw19(str(tmp_path), "frontal", check_images=False)
    assert len(train) == 20000 and len(test) == 4386
    # ra = n..1 so the first training face is row n-1 and the first test face row 4385
    assert train[0].image.endswith("image24385.jpg") and test[0].image.endswith("image04385.jpg")
    assert test[0].image.startswith(os.path.join(str(tmp_path), "data", "flickr"))
    assert all(r.visible.all() for r in frontal) and len(frontal) == (4386 + 1) // 2


def test_aflw_points_and_box_layout(tmp_path):
    """data rows are x1..x19, y1..y19; bbox rows are left, right, top, bottom."""
    write_aflw19(str(tmp_path), 6, 32, seed=1, train_count=3)
    info = scipy.io.loadmat(str(tmp_path / "AFLWinfo_release.mat"))
    ra = info["ra"].reshape(-1).astype(int) - 1
    rec = read_aflw19(str(tmp_path), "test")[0]
    np.testing.assert_array_equal(rec.landmarks[:, 0], info["data"][ra[3], :19])
    np.testing.assert_array_equal(rec.landmarks[:, 1], info["data"][ra[3], 19:])
    np.testing.assert_array_equal(rec.box, info["bbox"][ra[3]])


def test_aflw_small_set_split_rules(tmp_path):
    """Small sets: explicit train_count > split.json > floor(N * 20000 / 24386)."""
    write_aflw19(str(tmp_path), 40, 32)
    assert len(read_aflw19(str(tmp_path), "train")) == 40 * 20000 // 24386
    with open(tmp_path / "split.json", "w") as f:
        json.dump({"train_count": 25}, f)
    assert len(read_aflw19(str(tmp_path), "test")) == 15
    assert len(read_aflw19(str(tmp_path), "train", train_count=10)) == 10
    with pytest.raises(ValueError, match="train_count"):
        read_aflw19(str(tmp_path), "train", train_count=40)


def test_aflw_missing_files_are_named(tmp_path):
    """A wrong folder, a missing .mat and a missing image each give an error naming the path."""
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_aflw19(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match="AFLWinfo_release.mat"):
        read_aflw19(str(tmp_path), "train")
    write_aflw19(str(tmp_path), 8, 32, train_count=4)
    victim = read_aflw19(str(tmp_path), "test")[0].image
    os.remove(victim)
    with pytest.raises(FileNotFoundError, match=os.path.basename(victim)):
        read_aflw19(str(tmp_path), "test")


def test_lapa_layout_and_errors(tmp_path):
    """LaPa: split/images + split/labels (same stem, .png); a missing label map is named."""
    write_lapa(str(tmp_path), {"train": 3, "val": 1, "test": 2}, 32)
    recs = read_lapa(str(tmp_path), "test")
    assert [os.path.basename(r.image) for r in recs] == ["000004.jpg", "000005.jpg"]
    assert read_lapa_landmarks(recs[0].image.replace("images", "landmarks").replace(".jpg", ".txt")).shape == (106, 2)
    os.remove(recs[1].label)
    with pytest.raises(FileNotFoundError, match="000005.png"):
        read_lapa(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        read_lapa(str(tmp_path / "test"), "train")  # one level too deep
    import shutil
    shutil.rmtree(tmp_path / "val" / "labels")
    with pytest.raises(FileNotFoundError, match="val labels folder"):
        read_lapa(str(tmp_path), "val")


def test_warp_and_points_agree():
    """The image warp and the point mapping use the same coordinates: a lit pixel lands where its
    centre is mapped, for a crop with zoom, shift and rotation."""
    src = np.zeros((50, 60), np.uint8)
    src[23, 31] = 255
    m = jitter_matrix(np.random.default_rng(3), 40, 0.2, 0.1, 20.0) @ box_crop_matrix([20, 44, 10, 36], 40, 1.3)
    out = np.asarray(warp(Image.fromarray(src), m, 40, Image.NEAREST))
    x, y = apply_points(m, np.array([31.5, 23.5]))
    assert out[int(y), int(x)] == 255


def test_alignment_points_follow_pixel_centres(tmp_path):
    """A landmark at integer (x, y) (a pixel centre, as the files store it) lands on that pixel's
    image in the crop: the points and the warped image agree."""
    from mcf_fast.eval.datasets import FaceRecord
    src = np.zeros((50, 60, 3), np.uint8)
    src[23, 31] = 255
    Image.fromarray(src).save(tmp_path / "dot.png")
    rec = FaceRecord(str(tmp_path / "dot.png"), np.array([20.0, 44, 10, 36]), np.tile([31.0, 23.0], (19, 1)),
                     np.ones(19, bool))
    item = AlignmentData([rec], 128, [0.0] * 3, [1.0] * 3, augment=True, seed=2)[(0, 9)]
    img = item["image"][0].numpy()
    y, x = np.unravel_index(img.argmax(), img.shape)
    px, py = item["points"][0].tolist()
    assert abs(px - (x + 0.5)) <= 1.0 and abs(py - (y + 0.5)) <= 1.0


def test_alignment_item_maps_back_exactly(tmp_path):
    """Crop points through inv(M) give the original landmarks; the box centre goes to the crop centre."""
    write_aflw19(str(tmp_path), 4, 48, train_count=2)
    recs = read_aflw19(str(tmp_path), "train")
    ds = AlignmentData(recs, 32, MEAN, STD, augment=True, seed=5)
    item = ds[(1, 17)]
    back = apply_points(np.linalg.inv(item["matrix"].numpy()), item["points"].double().numpy())
    np.testing.assert_allclose(back, recs[1].landmarks, atol=1e-4)
    l, r, t, b = recs[0].box
    np.testing.assert_allclose(apply_points(box_crop_matrix(recs[0].box, 32, 1.2), np.array([(l + r) / 2, (t + b) / 2])),
                               [16, 16], atol=1e-9)
    assert torch.equal(ds[(1, 17)]["image"], item["image"])  # augmentation keyed by stream position


def test_parsing_item_labels(tmp_path):
    """Training labels are resized with nearest neighbour (only class values), out-of-image = 255."""
    write_lapa(str(tmp_path), {"train": 2, "test": 1}, 40)
    ds = ParsingData(read_lapa(str(tmp_path), "train"), 24, MEAN, STD, augment=True, seed=0)
    lab = ds[(0, 3)]["label"]
    assert lab.shape == (24, 24) and set(lab.unique().tolist()) <= set(range(11)) | {255}


def test_step_batches_resume_identically():
    """Step t's batch does not depend on where the run started."""
    full = list(StepBatches(7, 3, seed=4, start=0, total=9))
    tail = list(StepBatches(7, 3, seed=4, start=5, total=9))
    assert full[5:] == tail
    idx = [i for b in full[:7] for i, _ in b]  # 21 samples = 3 epochs, each a permutation of 0..6
    assert all(sorted(idx[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(3))


def test_soft_argmax_and_heatmap_loss():
    """A sharp peak at cell (j, i) reads out ((j + .5) s, (i + .5) s); the Gaussian loss is lowest there."""
    hm = torch.full((1, 2, 8, 8), -50.0)
    hm[0, 0, 2, 5] = 50.0
    hm[0, 1, 7, 0] = 50.0
    np.testing.assert_allclose(soft_argmax(hm, 4.0)[0].numpy(), [[22.0, 10.0], [2.0, 30.0]], atol=1e-4)
    target = torch.tensor([[[22.0, 10.0], [2.0, 30.0]]])
    assert heatmap_nll(hm * 0.02, target, 4.0) < heatmap_nll(hm.flip(-1) * 0.02, target, 4.0)


def _tiny_vit(img=32):
    return VisionTransformer(img_size=img, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def test_dense_model_shapes_levels_and_freeze():
    """4 levels from evenly spaced blocks; output on the stride-p/4 grid; a frozen encoder gets no grads."""
    assert level_blocks(12) == [2, 5, 8, 11] and level_blocks(24) == [5, 11, 17, 23] and level_blocks(2) == [0, 0, 1, 1]
    model = DenseModel(_tiny_vit(), 19, width=16, freeze_backbone=True)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 19, 16, 16) and model.stride == 2.0
    out.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_layer_decay_groups():
    """MAE's rule: block i at decay^(depth - i), embeddings decay^(depth + 1), head 1; no decay on biases."""
    model = DenseModel(_tiny_vit(), 11, width=16)
    groups = param_groups(model, 1.0, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    enc = model.encoder
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5 ** 5
    assert scale[id(enc.blocks[0].attn.qkv.weight)] == 0.5 ** 4
    assert scale[id(enc.blocks[3].mlp.fc2.weight)] == 0.5
    assert scale[id(model.head.pred.weight)] == 1.0
    assert wd[id(enc.blocks[0].attn.qkv.bias)] == 0.0 and wd[id(enc.blocks[0].attn.qkv.weight)] == 0.05
    assert id(enc.pos_embed) not in scale  # fixed sin-cos table: not trained


def test_arch_parsing_and_resize(tmp_path):
    """Presets and encoder.json both name an architecture; resizing keeps all weights but the position table."""
    a = parse_arch("vit_small_patch8_112")
    assert (a["embed_dim"], a["depth"], a["num_heads"], a["patch_size"], a["img_size"]) == (384, 12, 6, 8, 112)
    assert parse_arch("vit-tiny")["img_size"] == 224
    with pytest.raises(ValueError, match="unknown architecture"):
        parse_arch("resnet50")
    enc = _tiny_vit()
    with open(tmp_path / "encoder.json", "w") as f:
        json.dump(enc.arch, f)
    assert parse_arch(str(tmp_path)) == enc.arch
    big = resize_encoder(enc, 48)
    assert big.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(big.blocks[2].mlp.fc1.weight, enc.blocks[2].mlp.fc1.weight)
    with pytest.raises(ValueError, match="multiple"):
        resize_encoder(enc, 36)


def test_pretrained_and_scratch_start_from_the_same_head(tmp_path):
    """Fair comparison: with one seed, the head's initial weights do not depend on the encoder source."""
    from mcf_fast.eval.config import EvalConfig
    from mcf_fast.eval.train import build_model
    from mcf_fast.model.vit import save_encoder
    torch.manual_seed(5)
    save_encoder(_tiny_vit(), str(tmp_path))
    common = dict(task="alignment", data="unused", out="unused", seed=3, head_width=16)
    pre, _ = build_model(EvalConfig(encoder=str(tmp_path / "encoder.safetensors"), **common), 19)
    torch.manual_seed(99)  # whatever the global RNG did before must not matter
    scr, info = build_model(EvalConfig(encoder="random", arch=str(tmp_path / "encoder.json"), **common), 19)
    assert info["arch"] == pre.encoder.arch
    assert all(torch.equal(a, b) for a, b in zip(pre.head.state_dict().values(), scr.head.state_dict().values()))
    assert not torch.equal(pre.encoder.blocks[0].attn.qkv.weight, scr.encoder.blocks[0].attn.qkv.weight)
