"""Every entry point that reads a user's file refuses a small hostile one with one line and the right exit
code (2: bad input, 4: bad run folder), before it costs memory or time: convert FILE and RUN, pretrain's
teacher check, the init / decoder-init / teacher readers, prepare --boxes, scan and the loader on an
LMDB, eval's encoder. The memory each costs is measured in one subprocess (test_hostile_files_stay_small)."""
import json
import os
import pickle
import subprocess
import sys

import background
import hostile
import pytest
import torch
from test_checkpoint_integrity import _save, _tiny
from test_security_dcp import _rehash

from mcf_fast.pickle_bounds import RefusedFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_FILES = {"bomb.pth": hostile.torch_zip(hostile.shared_tuple_bomb()),
               "memo.pth": hostile.torch_zip(hostile.memo_jump()),
               "scalar.pth": hostile.torch_zip(hostile.numpy_subarray_scalar()),
               "deep.pth": hostile.torch_zip(hostile.deep_list())}


@pytest.fixture
def hostile_pths(tmp_path):
    for name, data in TORCH_FILES.items():
        assert len(data) <= 2600  # a zip's framing (~400 B) around a pickle of at most 2 KB
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_convert_file_refuses_each_hostile_pth(hostile_pths, capsys):
    """`convert FILE --out` on each hostile .pth: exit 2, one line naming the file and the reason, no output."""
    from mcf_fast import convert
    for name in TORCH_FILES:
        assert convert.main([str(hostile_pths / name), "--out", str(hostile_pths / "o.pt")]) == 2
        line = _one_line(capsys.readouterr().err)
        assert name in line and "refused" in line
    assert not (hostile_pths / "o.pt").exists()


def test_weight_readers_raise_one_refused_file(hostile_pths):
    """The readers behind --model.teacher, --model.init and --model.decoder_init raise RefusedFile (a
    ValueError) with one line: what pretrain turns into exit 2."""
    from mcf_fast.model.checkpoints import read_file
    from mcf_fast.model.teacher import build_teacher_vit
    for name in TORCH_FILES:
        for read in (read_file, lambda p: build_teacher_vit(f"checkpoint:{p}", {}, seed=0)):
            with pytest.raises(RefusedFile) as e:
                read(str(hostile_pths / name))
            assert len(str(e.value).splitlines()) == 1


def test_pretrain_teacher_check_refuses_a_bomb_at_parse_time(hostile_pths, capsys):
    """`pretrain --model.teacher checkpoint:BOMB` fails in the argument checks (the header reader walks the
    pickle first): exit 2, one line, nothing written."""
    from test_pretrain_e2e import TINY

    from mcf_fast.train.cli import parse_args
    out = hostile_pths / "run"
    with pytest.raises(SystemExit) as e:
        parse_args(["--out", str(out), *TINY, "--model.teacher", f"checkpoint:{hostile_pths / 'bomb.pth'}"])
    assert e.value.code == 2 and "expands" in _one_line(capsys.readouterr().err) and not out.exists()


def test_dcp_metadata_bombs_are_refused_by_resume_and_convert(tmp_path, capsys):
    """A checkpoint whose .metadata is the shared-tuple bomb or a memo jump (digests rewritten to match):
    resume's checkpoint scan raises UnsafeCheckpointError, `convert RUN` exits 4 with one line."""
    from mcf_fast import convert
    from mcf_fast.train import checkpoint as ckpt
    for name, data in (("bomb", hostile.shared_tuple_bomb()), ("memo", hostile.memo_jump())):
        run = tmp_path / name
        path = _save(run / "checkpoints", 1, _tiny())
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(data)
        _rehash(path)
        with pytest.raises(ckpt.UnsafeCheckpointError, match="refused before unpickling"):
            ckpt.latest(str(run / "checkpoints"))
        assert convert.main([str(run), "--out", str(tmp_path / "m.pt")]) == 4
        assert ".metadata" in _one_line(capsys.readouterr().err)


def test_lmdb_bombs_refuse_the_database_or_skip_the_value(tmp_path, capsys):
    """An LMDB whose __keys__ is a bomb: scan and the loader refuse it with one line; a value that is a
    bomb or a memo jump is skipped and counted as unsafe_pickle."""
    from test_data_hostile import _epoch_stats, _jpeg, _lmdb

    from mcf_fast.data import DataConfig, build_pretrain_loader
    from mcf_fast.data.scan import main as scan_main
    good = [pickle.dumps((_jpeg(i), i), protocol=2) for i in range(4)]
    _lmdb(tmp_path / "keys", keys_value=hostile.shared_tuple_bomb(), values=good)
    assert scan_main([str(tmp_path / "keys"), "--workers", "1"]) == 2
    assert "__keys__" in _one_line(capsys.readouterr().err)
    with pytest.raises(RefusedFile, match="__keys__ is not a plain pickle.*expands"):
        build_pretrain_loader(DataConfig(path=str(tmp_path / "keys"), workers=0), batch_size=2)
    _lmdb(tmp_path / "vals", values=good + [hostile.shared_tuple_bomb(), hostile.memo_jump()])
    loader, ids, st = _epoch_stats(tmp_path / "vals")
    assert st["skipped_by_reason"] == {"unsafe_pickle": 2} and not {4, 5} & set(ids)


def test_eval_refuses_a_pickle_named_safetensors(tmp_path, capsys):
    """`eval --encoder encoder.safetensors` that is really a pickle: exit 2, one line (was a traceback)."""
    from mcf_fast.eval.__main__ import main as eval_main
    enc = tmp_path / "enc"
    enc.mkdir()
    torch.save({"a": torch.zeros(2)}, enc / "encoder.safetensors")
    json.dump({"format": "mcf_fast.encoder.v1", "img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32,
               "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "qkv_bias": True}, open(enc / "encoder.json", "w"))
    (tmp_path / "data").mkdir()
    rc = eval_main(["alignment", "--data", str(tmp_path / "data"), "--encoder", str(enc / "encoder.safetensors"),
                    "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--workers", "0"])
    assert rc == 2 and "is not a safetensors file" in _one_line(capsys.readouterr().err)


def _probe(env: dict) -> subprocess.CompletedProcess:
    return background.run([sys.executable, os.path.join(ROOT, "tests", "hostile_probe.py")], timeout=1200, env=env,
                          cwd=ROOT)


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the memory probe's process is queued in the
    background (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_hostile_files_stay_small" for i in items):
        background.start("hostile_probe", _probe, {**os.environ, "OMP_NUM_THREADS": "1"}, cost=6)


@pytest.mark.late
def test_hostile_files_stay_small():
    """Each hostile file through each entry point that reads it (tests/hostile_probe.py, one process):
    refused with one line, and the process's peak memory grows by under 200 MB over all of them."""
    start_background(None)  # (already started by conftest)
    proc = background.result("hostile_probe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in report["cases"].items() if not v["refused"] or not v["one_line"]}
    assert not bad, bad
    assert len(report["cases"]) >= 20
    assert report["peak_growth_mb"] < 200, report


def test_pretrain_on_an_lmdb_with_a_hostile_pickle_is_one_line(tmp_path, capsys):
    """`pretrain --data.path DB` whose __keys__ pickles code or is a bomb: exit 2, one line naming the key
    (was a 50-line chained traceback)."""
    from test_data_hostile import _jpeg, _lmdb, _Plant
    from test_pretrain_e2e import TINY

    from mcf_fast import pretrain
    good = [pickle.dumps((_jpeg(i), i), protocol=2) for i in range(16)]
    for name, keys in (("code", pickle.dumps(_Plant(str(tmp_path / "PWNED")))), ("bomb", hostile.shared_tuple_bomb())):
        _lmdb(tmp_path / name, keys_value=keys, values=good)
        capsys.readouterr()
        rc = pretrain.main(["--out", str(tmp_path / f"r-{name}"), "--max-steps", "1", *TINY, "--data.path",
                            str(tmp_path / name), "--run.tensorboard", "false", "--run.export", "false"])
        err = capsys.readouterr().err  # the run's INFO lines come first; the refusal is the one error line
        assert rc == 2 and "Traceback" not in err and "__keys__ is not a plain pickle" in err.strip().splitlines()[-1]
    assert not (tmp_path / "PWNED").exists()
