"""Every export says what it holds: MODEL_CARD.md written by pre-training, scores added by eval, torch.hub and
timm load it in one line."""
import os
import re
import subprocess
import sys

import pytest
import torch

from mcf_fast.eval.__main__ import main as eval_main
from mcf_fast.eval.identity import encoder_digest
from mcf_fast.eval.toydata import write_aflw19
from mcf_fast.model.card import add_eval_scores, export_digest, write_model_card
from mcf_fast.model.vit import VisionTransformer, load_encoder, save_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model.img_size", "32", "--model.patch_size", "8", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
        "--model.decoder_num_heads", "2", "--model.proj_hidden", "64", "--model.proj_dim", "16",
        "--model.teacher_img_size", "32", "--model.teacher_patch_size", "8", "--model.teacher_embed_dim", "32",
        "--model.teacher_depth", "2", "--model.teacher_num_heads", "2", "--model.teacher_layers", "0,1",
        "--optim.batch_size", "8", "--data.synthetic_size", "24", "--run.progress", "none", "--run.threads", "1",
        "--run.tensorboard", "false", "--run.vis_every", "0"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A 2-step pre-training run's folder (python -m mcf_fast.pretrain, as a user runs it)."""
    out = tmp_path_factory.mktemp("card") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "mcf_fast.pretrain", "--out", str(out), "--max-steps", "2", *TINY],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_export_writes_the_card(export):
    """MODEL_CARD.md beside the export: architecture, parameters (counted from the file), normalisation, data
    and images seen, steps and epochs, recipe, teacher, git revision, the commands, the weights' digest."""
    card = open(export / "MODEL_CARD.md").read()
    enc = load_encoder(str(export))
    params = sum(p.numel() for p in enc.state_dict().values())
    for s in (f"parameters: {params:,}", "32-d, 2 blocks, 2 heads, patch 8", "input 32 px",
              "mean [0.485, 0.456, 0.406]", "synthetic faces (mcf_fast.data.synthetic), 24 samples per epoch",
              "2 optimizer steps x effective batch 8 = 16 images seen", "(0.67 epochs of 3 steps)",
              "mask ratio 0.75", "teacher: random ViT (32-d, 2 blocks", "mcf_fast git revision: ",
              f"as run: `python -m mcf_fast.pretrain --out {export} --max-steps 2",
              f"to reproduce: `python -m mcf_fast.pretrain --config {export}/config.json --out NEW_FOLDER`",
              "torch.hub.load(", "img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2",
              "pretrained_cfg_overlay", "(none yet:"):
        assert s in card, s
    assert re.search(r"git revision: ([0-9a-f]{40}|unknown)", card)
    assert f"<!-- encoder-digest: {export_digest(str(export))} -->" in card
    assert encoder_digest(str(export)) == export_digest(str(export))


def test_eval_adds_its_scores_to_the_card_once(export, tmp_path):
    """An eval run on the export records last/best and its command in the card; rerunning replaces its entry;
    a card describing other weights is left alone."""
    write_aflw19(str(tmp_path / "aflw"), 10, 40, seed=4, train_count=6)
    args = ["alignment", "--data", str(tmp_path / "aflw"), "--encoder", str(export / "encoder.safetensors"),
            "--out", str(tmp_path / "e"), "--max-steps", "1", "--batch-size", "3", "--workers", "0",
            "--head-width", "8", "--no-progress"]
    assert eval_main(args) == 0
    card = open(export / "MODEL_CARD.md").read()
    assert "(none yet:" not in card and card.count(f"<!-- begin eval {tmp_path / 'e'} -->") == 1
    assert "**alignment** (farl protocol, 4 test images, test): nme_diag last" in card
    assert f"command: `python -m mcf_fast.eval alignment --data {tmp_path / 'aflw'}" in card
    assert eval_main(args) == 0
    assert open(export / "MODEL_CARD.md").read().count("**alignment**") == 1
    assert not add_eval_scores(str(export), "other", "- x", "0" * 64)  # other weights: not written
    assert "- x" not in open(export / "MODEL_CARD.md").read()


def test_card_from_a_config_names_a_checkpoint_teacher(tmp_path):
    """A checkpoint teacher is named with its file's digest; the learning rate follows blr x batch / 256."""
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), str(tmp_path))
    teacher = tmp_path / "teacher.pth"
    torch.save({"w": torch.ones(2)}, teacher)
    from mcf_fast.train.config import from_preset
    cfg = from_preset("demo").to_dict()
    cfg["model"]["teacher"] = f"checkpoint:{teacher}"
    write_model_card(str(tmp_path), cfg, steps=10, steps_per_epoch=4, eff_batch=256, world_size=2)
    card = open(tmp_path / "MODEL_CARD.md").read()
    assert f"checkpoint `{teacher}` (sha256 " in card and "AdamW lr 0.0015 (blr 0.0015)" in card
    assert "10 optimizer steps x effective batch 256 = 2,560 images seen (2.50 epochs" in card
    assert "x 2 ranks" in card


def test_torch_hub_and_timm_load_the_export_in_one_line(export):
    """torch.hub.load(REPO, 'mcf_encoder', source='local', weights=PATH) and timm's pretrained_cfg_overlay both
    give the encoder pre-training exported (the same features)."""
    ours = load_encoder(str(export)).eval()
    x = torch.randn(2, 3, 32, 32)
    hub = torch.hub.load(ROOT, "mcf_encoder", source="local", weights=str(export / "encoder.safetensors"))
    assert torch.equal(hub.forward_features(x), ours.forward_features(x)) and not hub.training
    assert hub.norm_mean == [0.485, 0.456, 0.406]
    scratch = torch.hub.load(ROOT, "mcf_encoder", source="local", weights=str(export), pretrained=False)
    assert not torch.equal(scratch.forward_features(x), ours.forward_features(x))
    timm = pytest.importorskip("timm")
    t = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0, img_size=32, patch_size=8,
                          embed_dim=32, depth=2, num_heads=2,
                          pretrained_cfg_overlay=dict(file=str(export / "encoder.safetensors"))).eval()
    torch.testing.assert_close(t.forward_features(x), ours.forward_features(x), rtol=1e-5, atol=1e-5)
