"""No tool writes over its own input or a checkpoint: convert, prepare, eval and synthetic refuse such an
--out (after resolving symlinks) before any work, with one line and exit 2; convert's files get the
umask's mode."""
import os

import pytest
import torch
from test_checkpoint_integrity import _save, _tiny

from mcf_fast.model.vit import VisionTransformer
from mcf_fast.outputs import check_output, checkpoint_folder, read_paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with one complete checkpoint."""
    root = tmp_path_factory.mktemp("outputs")
    _save(root / "run" / "checkpoints", 1, _tiny())
    return root / "run"


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_check_output_cases(tmp_path, run):
    """is / lies inside / contains (when asked) an input, through symlinks; inside a checkpoint folder or a
    run's checkpoints/; an export folder stands for its two files."""
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    for out in (tmp_path / "data", tmp_path / "data" / "x", tmp_path / "link" / "y"):
        with pytest.raises(ValueError, match="the input"):
            check_output(str(out), [str(tmp_path / "data")])
    check_output(str(tmp_path), [str(tmp_path / "data")])  # contains: only refused when asked
    with pytest.raises(ValueError, match="contains the input"):
        check_output(str(tmp_path), [str(tmp_path / "data")], contains=True)
    step = run / "checkpoints" / "step_00000001"
    for out in (step / "__0_0.distcp", run / "checkpoints" / "new", step):
        with pytest.raises(ValueError, match="lies in the checkpoint folder"):
            check_output(str(out), [])
    assert checkpoint_folder(str(run / "model.pt")) is None
    check_output(str(run / "model.pt"), [str(step)])
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "encoder.safetensors").write_bytes(b"")
    assert read_paths(str(tmp_path / "exp"), "random", "", "vit-tiny") == [
        str(tmp_path / "exp" / "encoder.safetensors"), str(tmp_path / "exp" / "encoder.json")]


def test_convert_never_writes_over_its_input_or_a_checkpoint(tmp_path, run, capsys):
    """`convert mae.pth --out mae.pth` and `convert RUN --out RUN/checkpoints/step_N/__0_0.distcp` (both exit
    0 and destroyed the file before) exit 2 with one line; the file and the checkpoint stay intact."""
    from mcf_fast import convert
    from mcf_fast.train import checkpoint as ckpt
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": vit.state_dict()}, tmp_path / "mae.pth")
    before = (tmp_path / "mae.pth").read_bytes()
    os.symlink(tmp_path / "mae.pth", tmp_path / "alias.pth")
    for out in ("mae.pth", "alias.pth"):
        assert convert.main([str(tmp_path / "mae.pth"), "--out", str(tmp_path / out)]) == 2
        assert "is the input" in _err_line(capsys)
    assert (tmp_path / "mae.pth").read_bytes() == before
    step = run / "checkpoints" / "step_00000001"
    for args, why in ((["--out", str(step / "__0_0.distcp")], "lies inside the input"),  # the step folder read
                      (["--encoder", str(run / "checkpoints")], "lies in the checkpoint folder")):
        assert convert.main([str(run), *args]) == 2
        assert why in _err_line(capsys)
    assert ckpt.damage(str(step)) is None
    assert convert.main([str(tmp_path / "mae.pth"), "--encoder", str(step)]) == 2
    assert "checkpoint folder" in _err_line(capsys) and ckpt.damage(str(step)) is None


def test_convert_outputs_get_the_umask_mode(tmp_path, run):
    """convert's .safetensors and .pt files get 0666 less the umask, like every other file (not 0600)."""
    from mcf_fast import convert
    old = os.umask(0o027)
    try:
        convert.convert(str(run), out=str(tmp_path / "m.safetensors"))
        convert.convert(str(run), out=str(tmp_path / "m.pt"))
    finally:
        os.umask(old)
    assert {os.stat(tmp_path / n).st_mode & 0o777 for n in ("m.safetensors", "m.pt")} == {0o640}


def test_eval_prepare_and_synthetic_refuse_such_outputs(tmp_path, run, capsys):
    """eval (--out inside --data, paper --out = --lapa), prepare and synthetic (--out in a run's checkpoints/):
    exit 2, one line, nothing written."""
    from mcf_fast.data.prepare import main as prepare_main
    from mcf_fast.data.synthetic import main as synthetic_main
    from mcf_fast.eval.__main__ import main as eval_main
    for d in ("aflw", "lapa", "imgs"):
        (tmp_path / d).mkdir()
    assert eval_main(["alignment", "--data", str(tmp_path / "aflw"), "--encoder", "random", "--arch", "vit-tiny",
                      "--out", str(tmp_path / "aflw" / "eval")]) == 2
    assert "lies inside the input" in _err_line(capsys)
    assert eval_main(["paper", "--encoder", "random", "--arch", "vit-tiny", "--aflw19", str(tmp_path / "aflw"),
                      "--lapa", str(tmp_path / "lapa"), "--out", str(tmp_path / "lapa")]) == 2
    assert "is the input" in _err_line(capsys)
    ck = run / "checkpoints" / "faces"
    assert prepare_main(["--input", str(tmp_path / "imgs"), "--out", str(ck), "--detector", "none"]) == 2
    assert "checkpoint folder" in _err_line(capsys)
    assert synthetic_main(["--out", str(ck), "--num", "2", "--format", "wds"]) == 2
    assert "checkpoint folder" in _err_line(capsys)
    assert not ck.exists() and not (tmp_path / "aflw" / "eval").exists()
