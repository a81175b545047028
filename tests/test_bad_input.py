"""Every bad value or input file is one line and exit 2, before anything is written: no run folder, no
config.json, no .lock. Values and headers are refused by the pre-flight checks (before any model is
built); what only the weights can show (NaN, int32, pickled code) by the model build, which runs before
the run folder is touched."""
import argparse
import os

import pytest
import torch

from mcf_fast import pretrain
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import VisionTransformer
from mcf_fast.train import loop
from mcf_fast.train.checks import BadInput
from mcf_fast.train.cli import parse_args

CUDA = torch.cuda.is_available()


def _refused(argv, out, capsys) -> str:
    """Run the CLI in-process; assert exit 2, one line, no traceback, nothing at `out`; return the line."""
    try:
        rc = pretrain.main(argv + ["--out", str(out), "--max-steps", "1"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not os.path.exists(out), os.listdir(out)
    return lines[0]


@pytest.fixture
def no_build(monkeypatch):
    """Cases refused by the pre-flight checks must not even build the model."""
    def refuse(*a, **k):
        raise AssertionError("the model was built: the mistake was not caught by the pre-flight checks")
    monkeypatch.setattr(MCFModel, "from_config", refuse)


@pytest.fixture
def teacher_files(tmp_path):
    """A 2-block ViT (width 32) saved fine, with a NaN tensor, with an int32 tensor, and with pickled code."""
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    sd = vit.state_dict()
    nan = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.full_like(sd["blocks.1.mlp.fc1.weight"], float("nan"))})
    i32 = dict(sd, **{"blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"].to(torch.int32)})
    paths = {n: str(tmp_path / f"{n}.pth") for n in ("ok", "nan", "int32", "code", "code_decoder")}
    torch.save(sd, paths["ok"])
    torch.save(nan, paths["nan"])
    torch.save(i32, paths["int32"])
    torch.save({"model": sd, "args": argparse.Namespace(hook=os.system)}, paths["code"])
    dec = {"decoder_embed.weight": torch.zeros(128, 192), "decoder_blocks.0.norm1.weight": torch.ones(128),
           "decoder_blocks.1.norm1.weight": torch.ones(128)}
    torch.save({"model": dec, "args": argparse.Namespace(hook=os.system)}, paths["code_decoder"])
    return paths


PRECHECKED = [  # refused by the pre-flight checks, named by option
    (["--model.teacher_img_size", "60", "--model.teacher_patch_size", "16"], "--model.teacher_img_size 60"),
    (["--model.teacher_patch_size", "7"], "--model.teacher_patch_size 7"),
    (["--model.teacher_num_heads", "5"], "--model.teacher_num_heads 5"),
    (["--model.teacher_embed_dim", "130", "--model.teacher_num_heads", "2"], "divisible by 4"),
    (["--model.decoder_init_blocks", "99"], "--model.decoder_init_blocks 99"),
    (["--model.teacher", "pixel", "--model.perceptual_weight", "0", "--model.contrastive_weight", "0"],
     "the loss is always 0"),
    (["--model.teacher", "ema", "--model.teacher_layers", "0,6"], "beyond the 6-block teacher"),
    (["--model.teacher", "checkpoint:/dev/zero"], "not a regular file"),
    (["--model.teacher", "checkpoint:/dev"], "is a folder"),
    (["--run.device", "cuda:x"], "--run.device"),
]
if not CUDA:
    PRECHECKED += [(["--device", "cuda"], "no CUDA device is visible"),
                   (["--run.precision", "fp16"], "--run.precision 'fp16': is for GPUs")]


@pytest.mark.parametrize("argv,needle", PRECHECKED, ids=[" ".join(a) for a, _ in PRECHECKED])
def test_values_are_refused_before_the_model_is_built(argv, needle, tmp_path, capsys, no_build):
    """Each bad value (the teacher's geometry, the device, the precision, block counts) is one line, exit 2."""
    line = _refused(argv, tmp_path / "run", capsys)
    assert needle in line, line


def test_teacher_message_names_the_mismatch(capsys, tmp_path, no_build):
    """--model.teacher_patch_size 7 on the demo's 64 px teacher says which two options disagree."""
    line = _refused(["--model.teacher_patch_size", "7"], tmp_path / "run", capsys)
    assert "--model.teacher_img_size 64" in line and "multiple of --model.teacher_patch_size 7" in line


def test_decoder_init_blocks_beyond_the_file_from_its_header(teacher_files, tmp_path, capsys, no_build):
    """A decoder_init file holding 2 decoder blocks, asked for 3 (its header says so), is refused pre-flight."""
    path = str(tmp_path / "mae.pth")
    torch.save({"model": {"decoder_embed.weight": torch.zeros(1), "decoder_blocks.0.a": torch.zeros(1),
                          "decoder_blocks.1.a": torch.zeros(1)}}, path)
    line = _refused(["--model.decoder_init", path, "--model.decoder_depth", "4", "--model.decoder_init_blocks",
                     "3"], tmp_path / "run", capsys)
    assert "--model.decoder_init_blocks 3: asks for 3 decoder blocks" in line and "holds 2" in line


@pytest.mark.parametrize("name,needle", [
    ("nan", "'blocks.1.mlp.fc1.weight' holds 4096 non-finite value(s)"),
    ("int32", "'blocks.0.attn.qkv.weight' has dtype torch.int32, not a float dtype"),
    ("code", "weights-only"),
])
def test_teacher_weights_are_refused_before_the_folder(name, needle, teacher_files, tmp_path, capsys):
    """A teacher whose weights are NaN, int32 or pickled code is one line naming the file and the tensor,
    with no run folder (the model is built before the folder is claimed)."""
    argv = ["--model.teacher", f"checkpoint:{teacher_files[name]}", "--model.teacher_num_heads", "2",
            "--model.teacher_layers", "0,1"]
    line = _refused(argv, tmp_path / "run", capsys)
    assert line.startswith("python -m mcf_fast.pretrain: error: --model.teacher checkpoint:") and needle in line


def test_teacher_heads_must_divide_the_file_width(teacher_files, tmp_path, capsys):
    """Heads that do not divide a checkpoint teacher's width (not in its header) are refused at build."""
    line = _refused(["--model.teacher", f"checkpoint:{teacher_files['ok']}", "--model.teacher_num_heads", "5",
                     "--model.teacher_layers", "0,1"], tmp_path / "run", capsys)
    assert "--model.teacher" in line and "num_heads 5 does not divide embed_dim 32" in line


def test_safetensors_teacher_width_is_checked_from_its_header(tmp_path, capsys, no_build):
    """A .safetensors teacher's width is in its header: heads that do not divide it are refused pre-flight."""
    from safetensors.torch import save_file
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    save_file(vit.state_dict(), str(tmp_path / "t.safetensors"))
    line = _refused(["--model.teacher", f"checkpoint:{tmp_path / 't.safetensors'}", "--model.teacher_num_heads", "5",
                     "--model.teacher_layers", "0,1"], tmp_path / "run", capsys)
    assert "--model.teacher_num_heads 5: must divide the width 32 of the teacher" in line


def test_pickled_code_decoder_init_is_one_line(teacher_files, tmp_path, capsys):
    """A --model.decoder_init file that needs code to unpickle is one line (the globals it asks for)."""
    line = _refused(["--model.decoder_init", teacher_files["code_decoder"]], tmp_path / "run", capsys)
    assert "--model.decoder_init" in line and "posix.system" in line and "weights-only" in line


def test_train_raises_bad_input_before_touching_the_folder(teacher_files, tmp_path):
    """loop.train itself (as the demo and tests call it) checks and builds before claiming the folder."""
    cfg, _ = parse_args(["--out", str(tmp_path / "run"), "--model.teacher", f"checkpoint:{teacher_files['ok']}",
                         "--model.teacher_num_heads", "2", "--model.teacher_layers", "0,1"])
    cfg.model.teacher = f"checkpoint:{teacher_files['nan']}"
    with pytest.raises(BadInput, match="non-finite"):
        loop.train(cfg)
    cfg.model.teacher_layers = (0, 7)  # a value set after parsing is checked by train too
    with pytest.raises(BadInput, match="beyond the 2-block teacher"):
        loop.train(cfg)
    assert not os.path.exists(tmp_path / "run")
