"""The demo: a teacher stage, MCF against its checkpoint, fixed held-out faces, an honest summary."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mcf_fast.data.config import IMAGENET_MEAN, IMAGENET_STD
from mcf_fast.eval.probe import probe, random_encoder
from mcf_fast.train.heldout import heldout_faces, heldout_masks, pixel_errors

TINY = {"model": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                      decoder_depth=1, decoder_num_heads=2, proj_hidden=64, proj_dim=16),
        "data": dict(img_size=32, synthetic_size=64), "optim": dict(batch_size=8)}


def test_pixel_errors_against_exact_answers():
    """A perfect reconstruction scores 0; filling with the image's mean colour scores the baseline exactly."""
    imgs = heldout_faces(0, 4, 32, IMAGENET_MEAN, IMAGENET_STD)
    _, _, mask = heldout_masks(4, 16, 0.75)
    assert pixel_errors(imgs, imgs, mask, 8, IMAGENET_MEAN, IMAGENET_STD)["masked_mse"] < 1e-10
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = imgs * s + m
    flat = ((rgb.mean((2, 3), keepdim=True).expand_as(rgb)) - m) / s
    e = pixel_errors(imgs, flat, mask, 8, IMAGENET_MEAN, IMAGENET_STD)
    assert e["masked_mse"] == pytest.approx(e["mean_colour_mse"], rel=1e-5)
    assert e["mean_colour_mse"] > 0.001 and e["hf_ratio"] < 1e-6


def test_heldout_faces_are_fixed_and_unseen():
    """Held-out faces and masks are the same on every call and differ from every training face."""
    a = heldout_faces(3, 2, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(a, heldout_faces(3, 2, 32, IMAGENET_MEAN, IMAGENET_STD))
    assert all(torch.equal(x, y) for x, y in zip(heldout_masks(2, 16, 0.75), heldout_masks(2, 16, 0.75)))
    from mcf_fast.data.synthetic import draw_face
    train0 = torch.from_numpy(draw_face(3, 0, 32).image).permute(2, 0, 1).float() / 255
    assert not torch.allclose((a[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1) +
                               torch.tensor(IMAGENET_MEAN).view(3, 1, 1)), train0, atol=0.05)


def test_probe_is_deterministic_and_scores_in_range():
    """The linear probe is a fixed function of the encoder: same numbers twice, metrics in range."""
    arch = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0,
                qkv_bias=True)
    a = probe(random_encoder(arch, 0), 24, 12)
    assert a == probe(random_encoder(arch, 0), 24, 12)
    assert 0 < a["nme_diag"] < 1 and 0 <= a["f1_mean"] <= 1


def test_demo_runs_both_stages_and_summarises(tmp_path, capsys):
    """Teacher stage -> checkpoint -> MCF against it; same held-out faces in every snapshot; summary printed."""
    from mcf_fast.demo import run_demo
    out = str(tmp_path / "demo")
    s = run_demo(out, seed=0, teacher_steps=2, steps=3, threads=1, overrides=TINY, probe_sizes=(16, 8))
    cfg = json.load(open(os.path.join(out, "config.json")))
    teacher_file = os.path.join(out, "teacher", "mae.safetensors")
    assert cfg["model"]["teacher"] == f"checkpoint:{teacher_file}" and cfg["model"]["decoder_init"] == teacher_file
    assert json.load(open(os.path.join(out, "teacher", "config.json")))["model"]["teacher"] == "pixel"
    assert os.path.exists(os.path.join(out, "encoder.safetensors"))
    shots = sorted(f for f in os.listdir(os.path.join(out, "images")) if f.startswith("recon_step"))
    assert len(shots) == 3
    grids = [np.asarray(Image.open(os.path.join(out, "images", f))) for f in shots]
    w = grids[0].shape[1] // 4  # columns: original | masked | reconstruction | paste
    for g in grids[1:]:
        assert np.array_equal(g[:, :2 * w], grids[0][:, :2 * w])  # the same faces under the same masks
    assert not np.array_equal(grids[0][:, 2 * w:3 * w], grids[-1][:, 2 * w:3 * w])  # the reconstruction moved
    for k in ("recon_teacher", "recon_mcf"):
        assert 0 < s[k]["masked_mse"] and 0 < s[k]["mean_colour_mse"]
    assert s["probe"]["pretrained"] != s["probe"]["random_init"]
    assert json.load(open(os.path.join(out, "demo_summary.json")))["steps"] == 3
    printed = capsys.readouterr().out
    assert "mean-colour baseline" in printed and "gain over scratch" in printed
    ran_on = json.load(open(os.path.join(out, "demo_summary.json")))["ran_on"]  # where the numbers came from
    assert ran_on["device"] == "cpu" and ran_on["precision"] in ("bf16", "fp32") and ran_on["cores"] >= 1
    assert f"ran on: {ran_on['cpu']}" in printed
