"""`--config FILE` is checked by the command line's rules: known sections and keys (did-you-mean), values of
the field's type, the same range checks; the file is read bounded (no device, FIFO or huge file is read)."""
import json
import os

import pytest

from mcf_fast.train.cli import parse_args
from mcf_fast.train.config import from_preset
from mcf_fast.train.config_file import config_from_dict


def _refused(path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path), "--out", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def _write(tmp_path, obj, raw: str | None = None):
    path = tmp_path / "c.json"
    path.write_text(raw if raw is not None else json.dumps(obj))
    return path


@pytest.mark.parametrize("obj,needle", [
    ({"optm": {"lr": 1e-3}}, "section optm is unknown (did you mean optim?)"),
    ({"model": {"dept": 3}}, "key model.dept is unknown (did you mean model.depth?)"),
    ({"model": "vit-b"}, "section 'model' must be a JSON object of fields, got a string"),
    ([{"model": {}}], "must be a JSON object of sections"),
    ("model", "must be a JSON object of sections"),
    ({"preset": "vit_s"}, "preset vit_s is unknown (did you mean vit-s?)"),
    ({"model": {"depth": 3.5}}, "--model.depth: a number 3.5 is not an integer"),
    ({"model": {"depth": True}}, "--model.depth: true/false True is not an integer"),
    ({"model": {"depth": None}}, "--model.depth: null None is not an integer"),
    ({"data": {"hflip": 1}}, "--data.hflip: an integer 1 is not true/false"),
    ({"model": {"teacher": 5}}, "--model.teacher: an integer 5 is not a string"),
    ({"model": {"teacher_layers": [0, "x"]}}, "--model.teacher_layers[1]: a string 'x' is not an integer"),
    ({"model": {"teacher_layers": 3}}, "--model.teacher_layers: an integer 3 is not a list"),
    ({"model": {"temperature": "NaN"}}, "--model.temperature nan: must be a finite number"),
    ({"model": {"depth": "three"}}, "--model.depth: cannot read 'three'"),
    ({"model": {"num_heads": 5}}, "--model.num_heads 5: must divide"),
    ({"model": {"teacher": "moco"}}, "--model.teacher 'moco': unknown teacher"),
])
def test_bad_content_is_one_line(obj, needle, tmp_path, capsys):
    """Each wrong section, key, type or value is one line with exit 2, naming it as the command line would."""
    line = _refused(_write(tmp_path, obj), capsys)
    assert needle in line, line


def test_json_nan_literal_and_deep_nesting(tmp_path, capsys):
    """A bare NaN in the JSON is a non-finite value like any other; JSON nested too deeply is one line."""
    assert "must be a finite number" in _refused(_write(tmp_path, None, '{"optim": {"lr": NaN}}'), capsys)
    assert "nested too deeply" in _refused(_write(tmp_path, None, "[" * 200_000 + "]" * 200_000), capsys)


def test_devices_fifos_and_huge_files_are_not_read(tmp_path, capsys):
    """/dev/zero, a FIFO with no writer and a 64 GB sparse file are refused from their metadata, unread."""
    assert "is not a regular file" in _refused("/dev/zero", capsys)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    assert "is not a regular file" in _refused(fifo, capsys)  # would block forever if it were opened to read
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)
    assert "over the 1048576-byte limit" in _refused(huge, capsys)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    assert "is not UTF-8 text" in _refused(binary, capsys)


def test_strings_read_as_on_the_command_line(tmp_path):
    """String values go through the command line's parser: '12' is 12, '0,2' a tuple, 'false' False."""
    cfg, _ = parse_args(["--config", str(_write(tmp_path, {"preset": "demo", "model": {
        "depth": "3", "teacher_layers": "0,2"}, "data": {"hflip": "false"}}))])
    assert cfg.model.depth == 3 and cfg.model.teacher_layers == (0, 2) and cfg.data.hflip is False


def test_a_partial_file_starts_from_its_preset(tmp_path):
    """A file naming a preset starts from that preset's values; command-line options still override it."""
    cfg, _ = parse_args(["--config", str(_write(tmp_path, {"preset": "demo", "optim": {"max_steps": 5}})),
                         "--model.depth", "4"])
    demo = from_preset("demo")
    assert cfg.optim.max_steps == 5 and cfg.model.depth == 4 and cfg.model.embed_dim == demo.model.embed_dim
    assert cfg.preset == "demo"


def test_a_run_config_round_trips():
    """A resolved config (what a run writes to config.json) reads back to the same config."""
    cfg = from_preset("vit-s")
    cfg.model.teacher_layers = (1, 3)
    cfg.data.mean = (0.5, 0.5, 0.5)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
