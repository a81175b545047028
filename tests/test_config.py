"""Config: presets, command-line overrides, and errors before any work starts."""
import json

import pytest
from runners import main_here

from mcf_fast import pretrain
from mcf_fast.train.cli import parse_args
from mcf_fast.train.config import PRESETS, from_preset
from mcf_fast.train.optim import cosine_lr, ema_momentum, param_groups


def test_every_preset_validates():
    """Each named preset is a valid configuration (vit-b-paper once a teacher path is given)."""
    for name in PRESETS:
        cfg = from_preset(name)
        if name == "vit-b-paper":
            with pytest.raises(ValueError, match="needs a path"):
                cfg.validate()
            cfg.model.teacher = "checkpoint:/x.pth"
        cfg.validate()


def test_overrides_and_shortcuts():
    """--SECTION.FIELD and the shortcut flags reach the right fields with the right types."""
    cfg, _ = parse_args(["--model.depth", "3", "--model.teacher_layers", "0,2", "--out", "/tmp/x",
                         "--max-steps", "7", "--seed", "5", "--data.hflip", "false", "--optim.blr", "1e-3"])
    assert cfg.model.depth == 3 and cfg.model.teacher_layers == (0, 2)
    assert cfg.run.out == "/tmp/x" and cfg.optim.max_steps == 7 and cfg.run.seed == 5
    assert cfg.data.hflip is False and cfg.optim.blr == 1e-3


def test_model_img_size_carries_to_data():
    """Setting only --model.img_size moves the data size with it."""
    cfg, _ = parse_args(["--model.img_size", "96", "--model.patch_size", "16"])
    assert cfg.data.img_size == 96


@pytest.mark.parametrize("argv,needle", [
    (["--model.depht", "3"], "did you mean --model.depth?"),
    (["--model.depth", "three"], "cannot read"),
    (["--model.mask_ratio", "1.0"], "mask_ratio"),
    (["--model.num_heads", "5"], "must divide"),
    (["--model.teacher", "moco"], "teacher"),
    (["--model.teacher_layers", "0,9"], "teacher_layers"),
    (["--optim.batch_size", "0"], "batch_size"),
    (["--run.precision", "fp8"], "precision"),
    (["--preset", "vit-h"], "invalid choice"),
])
def test_bad_values_are_clear_errors(argv, needle):
    """Unknown keys and bad values exit 2 with one line naming the field, before any work (the CLI's main
    in this process: the module's entry is run as a program by tests/test_pretrain_e2e.py)."""
    rc, err = main_here(pretrain.main, [*argv, "--out", "/nonexistent/never"])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_help_lists_fields_with_docs(capsys):
    """--help documents every section's fields."""
    rc, _ = main_here(pretrain.main, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert rc == 0
    for key in ("--model.teacher", "--optim.blr", "--data.path", "--run.ckpt_every", "--dist.negatives"):
        assert key in out
    assert "Weight of the perceptual" in out


def test_print_config_roundtrip(tmp_path, capsys):
    """A printed config fed back with --config gives the same config."""
    rc, _ = main_here(pretrain.main, ["--model.depth", "2", "--print-config"])
    printed = capsys.readouterr().out
    assert rc == 0
    path = tmp_path / "c.json"
    path.write_text(printed)
    cfg, _ = parse_args(["--config", str(path)])
    assert json.loads(json.dumps(cfg.to_dict())) == json.loads(printed)
    assert cfg.model.depth == 2


def test_cosine_lr_schedule():
    """Linear warm-up to the base LR, then a half cosine to min_lr."""
    assert cosine_lr(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.0) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_momentum_schedules():
    """Constant m, or cosine from m at step 0 to 1 at the end."""
    assert ema_momentum(50, 100, 0.99, "constant") == 0.99
    assert ema_momentum(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99, "cosine") == pytest.approx(1.0)


def test_no_weight_decay_on_biases_norms_tokens():
    """Weight decay applies to weight matrices only."""
    from mcf_fast.model.mcf import MCFModel
    cfg = from_preset("demo").model
    cfg.depth, cfg.decoder_depth, cfg.teacher = 1, 1, "pixel"
    model = MCFModel.from_config(cfg, seed=0)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in nd and "mask_token" in nd and "encoder.blocks.0.norm1.weight" in nd
    assert "encoder.blocks.0.attn.qkv.bias" in nd
    assert "encoder.blocks.0.attn.qkv.weight" in d and "decoder_pred.weight" in d
    assert not any(n.startswith(("target_", "perceptual")) for n in d | nd)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
