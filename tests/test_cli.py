"""The pretrain CLI catches mistakes at once: one line, exit 2, no traceback, nothing built."""
import argparse
import os
import re

import pytest
import torch

from mcf_fast import pretrain
from mcf_fast.train import checks, cli


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    """Any case that got as far as training (or the demo) fails the test instead of running it."""
    import mcf_fast.demo
    import mcf_fast.train.loop

    def refuse(*a, **k):
        raise AssertionError("training started: the mistake was not caught before the model was built")
    monkeypatch.setattr(mcf_fast.train.loop, "train", refuse)
    monkeypatch.setattr(mcf_fast.demo, "run_demo", refuse)


def _fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


def _options() -> set[str]:
    return {s for a in cli.build_parser()._actions for s in a.option_strings}


def _assert_names_real_options(msg: str):
    named = set(re.findall(r"--[a-z][a-z_.-]*[a-z]", msg))
    assert named <= _options(), named - _options()


@pytest.fixture
def teacher_files(tmp_path):
    """A 2-block ViT teacher as our encoder.safetensors and as a MoCo v3 style .pth with an argparse Namespace."""
    from mcf_fast.model.vit import VisionTransformer, save_encoder
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    st, _ = save_encoder(vit, str(tmp_path / "enc"))
    pth = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()},
                "epoch": 3, "args": argparse.Namespace(lr=0.1)}, pth)
    return st, str(pth)


def test_abbreviation_is_refused_with_suggestion(capsys):
    """--model.dept is not silently --model.depth: one line with 'did you mean --model.depth?'."""
    line = _fail(["--model.dept", "6"], capsys)
    assert "unknown option --model.dept: did you mean --model.depth?" in line


@pytest.mark.parametrize("argv,want", [
    (["--model.depht", "3"], "--model.depth"),
    (["--optim.bllr=1e-3"], "--optim.blr"),
    (["--max-step", "5"], "--max-steps"),
])
def test_typo_suggests_the_real_option(argv, want, capsys):
    """A misspelt key (also in --key=value form, also a shortcut) names the closest real option."""
    line = _fail(argv, capsys)
    assert f"did you mean {want}?" in line
    _assert_names_real_options(line.rsplit(":", 1)[1])  # the suggestion; the echoed typo is the user's


def test_help_shows_the_preset_defaults(capsys):
    """--help shows the values of the preset in use (demo by default, vit-s when asked), never None."""
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    demo = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in demo and "preset default" not in demo
    assert re.search(r"--model\.img_size INT Input side in pixels \(square images\)\. \(default: 64\)", demo)
    assert "(default: 0,1,2,3)" in demo and "(default: 0.0015)" in demo
    with pytest.raises(SystemExit):
        pretrain.main(["--preset", "vit-s", "--help"])
    vits = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "'vit-s' preset" in vits and "(default: 384)" in vits and "(default: 0.00015)" in vits
    assert "(default: None)" not in vits


CASES = [  # each is refused before any work
    (["--optim.batch_size", "1"], "BatchNorm"),
    (["--optim.batch_size", "1000000"], "synthetic_size"),
    (["--model.mlp_ratio", "-1"], "mlp_ratio"),
    (["--model.mlp_ratio", "0"], "mlp_ratio"),
    (["--model.temperature", "nan"], "finite"),
    (["--optim.epochs", "inf", "--optim.max_steps", "0"], "finite"),
    (["--optim.epochs", "nan"], "finite"),
    (["--optim.warmup_epochs", "nan"], "finite"),
    (["--run.seed", "-5"], "run.seed"),
    (["--run.seed", str(2**64)], "run.seed"),
    (["--seed", "-5"], "run.seed"),
    (["--model.teacher", "random:x"], "takes no argument"),
    (["--model.teacher", "checkpoint:/nonexistent/teacher.pth"], "does not exist"),
    (["--model.decoder_init", "/nonexistent/mae.pth"], "does not exist"),
    (["--data.path", "/nonexistent/faces"], "does not exist"),
    (["--data.path", "/nonexistent/faces-{000000..000009}.tar"], "does not exist"),
    (["--data.loader", "dali"], "synthetic"),
    (["--run.threads", "100000"], "run.threads"),
    (["--optim.lr", "nan"], "finite"),
    (["--optim.lr", "-1"], "optim.lr"),
    (["--optim.clip_grad", "nan"], "finite"),
    (["--optim.blr", "inf"], "finite"),
    (["--model.perceptual_weight", "inf"], "finite"),
    (["--data.mean", "nan,nan,nan"], "finite"),
    (["--model.mask_ratio", "0.0", "--model.teacher", "pixel"], "mask_ratio"),
    (["--config", "/nonexistent/config.json"], "--config"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_before_any_work(argv, needle, capsys):
    """Each bad value, path or combination exits 2 with one line naming it, and only real options."""
    line = _fail(argv + ["--out", "/nonexistent/never"], capsys)
    assert needle in line, line
    _assert_names_real_options(line)


def test_data_path_message_names_every_layout(capsys):
    """A missing data path says 'does not exist' and lists folders, shards, lists and LMDB."""
    line = _fail(["--data.path", "/nonexistent/faces"], capsys)
    assert "does not exist" in line and "LMDB" in line and ".tar" in line and "synthetic" in line


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_teacher_layers_beyond_checkpoint_depth(fmt, teacher_files, capsys):
    """Teacher layers past a checkpoint teacher's depth (read from its header) are refused."""
    path = teacher_files[0] if fmt == "safetensors" else teacher_files[1]
    line = _fail(["--model.teacher", f"checkpoint:{path}", "--model.teacher_layers", "0,5"], capsys)
    assert "beyond the 2-block teacher" in line and "0..1" in line


def test_checkpoint_header_depth_without_loading(teacher_files):
    """The depth reader sees both layouts (and a pickled Namespace) without unpickling any real object."""
    st, pth = teacher_files
    assert checks.teacher_depth(st) == 2 and checks.teacher_depth(pth) == 2
    keys = checks.checkpoint_keys(pth)
    assert "state_dict.module.base_encoder.blocks.1.mlp.fc2.weight" in keys and "epoch" in keys


def test_valid_checkpoint_teacher_passes(teacher_files):
    """A fitting checkpoint teacher and layers inside its depth are accepted."""
    cfg, _ = cli.parse_args(["--model.teacher", f"checkpoint:{teacher_files[1]}", "--model.teacher_layers", "0,1",
                             "--out", "/nonexistent/never"])
    assert cfg.model.teacher.endswith("moco.pth.tar")


def test_numbers_are_checked_without_torch_models(tmp_path):
    """check_numbers flags nan in a float tuple and an out-of-range int set directly on the config."""
    from mcf_fast.train.config import from_preset
    cfg = from_preset("demo")
    cfg.data.std = (0.2, float("inf"), 0.2)
    with pytest.raises(ValueError, match="--data.std .*finite"):
        cfg.validate()
    cfg = from_preset("demo")
    cfg.optim.max_steps = 2**70
    with pytest.raises(ValueError, match="--optim.max_steps"):
        cfg.validate()
    assert os.path.exists(tmp_path)


def test_no_arguments_runs_the_demo(monkeypatch):
    """`python -m mcf_fast.pretrain` with no argument is the two-stage demo, not a bare preset run."""
    import mcf_fast.demo
    calls = []
    monkeypatch.setattr(mcf_fast.demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    assert pretrain.main([]) == 0 and calls == [((), {})]


def test_demo_cli_refuses_bad_counts(capsys):
    """The demo's own options are checked too (and not abbreviated)."""
    from mcf_fast.demo import main
    for argv in (["--steps", "0"], ["--seed", "-1"], ["--teacher-step", "5"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err
