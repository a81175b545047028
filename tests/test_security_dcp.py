"""A run folder's DCP files execute nothing: hostile `.metadata` or byte entries are refused on resume and
convert, naming the class and the file, and a marker file the payload would create never appears."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import pytest
import torch
from test_checkpoint_integrity import _save, _tiny

from mcf_fast.train import checkpoint as ckpt
from mcf_fast.train.dcp_safe import UnsafeCheckpointError, read_metadata_file


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


class _Payload:
    """Unpickles to os.system('touch MARKER'): what an attacker's checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rehash(path):
    """Rewrite COMPLETE's digests to match the folder, as an attacker who edits the files would."""
    m = json.load(open(os.path.join(path, "COMPLETE")))
    for name in m["files"]:
        data = open(os.path.join(path, name), "rb").read()
        m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(m, open(os.path.join(path, "COMPLETE"), "w"))


def _poison_metadata(path, marker):
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    _rehash(path)


def test_real_metadata_reads_through_the_restricted_unpickler(tmp_path, tiny):
    """The allow-list covers everything a real MCF + fused-AdamW checkpoint pickles (tensors and byte entries)."""
    path = _save(tmp_path, 1, tiny)
    md = read_metadata_file(os.path.join(path, ".metadata"))
    kinds = {type(v).__name__ for v in md.state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata", "BytesStorageMetadata"}
    assert md.state_dict_metadata["model.encoder.cls_token"].properties.dtype == torch.float32


@pytest.mark.parametrize("rehash", [True, False], ids=["digests-rewritten", "legacy-marker"])
def test_hostile_metadata_is_refused_on_resume(tmp_path, tiny, rehash):
    """A .metadata reducing to os.system is refused by latest() and load(), naming posix.system and the file."""
    marker = tmp_path / "PWNED"
    path = _save(tmp_path / "ck", 1, tiny)
    _poison_metadata(path, marker)
    if not rehash:
        json.dump({"step": 1, "world_size": 1, "finite": True}, open(os.path.join(path, "COMPLETE"), "w"))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata asks to build posix\.system.*refused"):
        ckpt.latest(str(tmp_path / "ck"))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        ckpt.load(path, *_tiny())
    assert not marker.exists()


def test_hostile_byte_entry_in_distcp_is_refused(tmp_path, tiny):
    """A non-tensor entry (DCP loads these with weights_only=False) pointing at a hostile pickle is refused."""
    marker = tmp_path / "PWNED"
    path = _save(tmp_path / "ck", 1, tiny)
    meta_path = os.path.join(path, ".metadata")
    md = read_metadata_file(meta_path)
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    shard = os.path.join(path, "__0_0.distcp")
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    key = next(k for k in md.storage_data if k.fqn == "optim.param_groups.0.lr")
    info = md.storage_data[key]
    info.offset, info.length = offset, len(buf.getvalue())
    with open(meta_path, "wb") as f:
        pickle.dump(md, f)
    _rehash(path)
    with pytest.raises(UnsafeCheckpointError, match="optim.param_groups.0.lr"):
        ckpt.load(path, *_tiny())
    assert not marker.exists()


def test_hostile_extra_state_is_refused(tmp_path, tiny):
    """extra_rank0.pt stays on torch.load(weights_only=True): a pickled os.system in it is refused, never run."""
    marker = tmp_path / "PWNED"
    path = _save(tmp_path / "ck", 1, tiny)
    with open(os.path.join(path, "extra_rank0.pt"), "wb") as f:
        torch.save({"step": 1, "x": _Payload(marker)}, f)
    _rehash(path)
    with pytest.raises(ckpt.CheckpointError, match="extra_rank0.pt does not load"):
        ckpt.load(path, *_tiny())
    assert not marker.exists()


def test_storage_paths_outside_the_folder_are_refused(tmp_path, tiny):
    """A storage entry naming ../something would make DCP open files outside the checkpoint: refused."""
    path = _save(tmp_path / "ck", 1, tiny)
    meta_path = os.path.join(path, ".metadata")
    md = read_metadata_file(meta_path)
    next(iter(md.storage_data.values())).relative_path = "../../etc/passwd"
    with open(meta_path, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeCheckpointError, match="points outside the checkpoint folder"):
        read_metadata_file(meta_path)


def test_convert_refuses_hostile_metadata(tmp_path, tiny, capsys):
    """`python -m mcf_fast.convert RUN` and `... STEP_DIR` refuse the hostile file with a one-line error, exit 4."""
    from mcf_fast import convert
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    path = _save(run / "checkpoints", 1, tiny)
    _poison_metadata(path, marker)
    for target in (str(run), path):
        with pytest.raises(UnsafeCheckpointError, match="posix.system"):
            convert.convert(target, out=str(tmp_path / "m.safetensors"))
        capsys.readouterr()
        assert convert.main([target, "--out", str(tmp_path / "m.safetensors")]) == 4
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "posix.system" in err
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()


def test_convert_verifies_digests(tmp_path, tiny):
    """convert of a step folder whose shard no longer matches its digest is refused, naming the file."""
    from mcf_fast import convert
    path = _save(tmp_path / "run" / "checkpoints", 1, tiny)
    shard = os.path.join(path, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp does not match its sha256"):
        convert.convert(path, out=str(tmp_path / "m.pt"))


def test_pretrain_resume_refuses_hostile_metadata(tmp_path, capsys):
    """Rerunning `pretrain` on a run whose checkpoint carries a hostile .metadata stops before unpickling it,
    with a one-line error naming the class (exit code 4)."""
    from test_pretrain_e2e import TINY

    from mcf_fast import pretrain
    marker = tmp_path / "PWNED"
    argv = ["--out", str(tmp_path / "r"), "--max-steps", "2", *TINY, "--run.ckpt_every", "2",
            "--run.tensorboard", "false", "--run.export", "false", "--run.vis_every", "0"]
    assert pretrain.main(argv) == 0
    _poison_metadata(str(tmp_path / "r" / "checkpoints" / "step_00000002"), marker)
    capsys.readouterr()
    assert pretrain.main(argv) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m mcf_fast.pretrain: error: ") and "posix.system" in err and "step_00000002" in err
    assert not marker.exists()


# --- bounded metadata: values checked before anything is allocated by them ------------------------
class _Reduces:
    """Pickles as `fn(*args)`: how a hand-made .metadata smuggles a value DCP itself never writes."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _edit_metadata(path, edit):
    """Rewrite .metadata after `edit(md)` (and the digests, as an attacker would)."""
    meta_path = os.path.join(path, ".metadata")
    md = read_metadata_file(meta_path)
    edit(md)
    with open(meta_path, "wb") as f:
        pickle.dump(md, f)
    _rehash(path)


def _first_tensor(md):
    return next(k for k, m in md.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "chunks"))


def _set_size(size):
    """Replace the first model tensor's last dimension (a callable: the whole size) in its metadata."""
    def edit(md):
        m = md.state_dict_metadata[_first_tensor(md)]
        m.size = size if not isinstance(size, int) else torch.Size([*m.size[:-1], size])
    return edit


def _set_dtype(md):
    md.state_dict_metadata[_first_tensor(md)].properties.dtype = torch.qint8


def _set_transform(md):
    next(iter(md.storage_data.values())).transform_descriptors = ["stream.zstd"]


VALUE_CASES = {
    "size 2^40": (_set_size(1 << 40), "larger than its chunks"),
    "negative size": (_set_size(-3), r"has size torch.Size\(\[1, 1, -3\]\)"),
    "Size('abc')": (_set_size(_Reduces(torch.Size, "abc")), r"builds invalid values \(TypeError"),
    "qint8": (_set_dtype, "has dtype torch.qint8"),
    "stream transform": (_set_transform, "asks for stream transforms"),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_metadata_values_are_refused_with_one_line(tmp_path, tiny, case, capsys):
    """.metadata with a 2^40 or negative size, Size('abc'), qint8 or a decompressing transform: resume and
    convert refuse it by name (exit 4, one line) before allocating or reading anything by it."""
    from mcf_fast import convert
    edit, why = VALUE_CASES[case]
    run = tmp_path / "run"
    path = _save(run / "checkpoints", 1, tiny)
    _edit_metadata(path, edit)
    with pytest.raises(UnsafeCheckpointError, match=why):
        ckpt.latest(str(run / "checkpoints"))
    assert convert.main([str(run), "--out", str(tmp_path / "m.pt")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".metadata" in err[0] and not (tmp_path / "m.pt").exists()


def test_windows_written_checkpoint_converts_on_linux(tmp_path, tiny):
    """A checkpoint_id pickled as pathlib.WindowsPath (a run saved on Windows) builds as a pure path: convert works."""
    import pathlib

    from mcf_fast import convert
    run = tmp_path / "run"
    path = _save(run / "checkpoints", 1, tiny)

    def edit(md):
        md.storage_meta.checkpoint_id = _Reduces(pathlib.WindowsPath, "C:\\runs\\r\\step_00000001")
    _edit_metadata(path, edit)
    assert isinstance(read_metadata_file(os.path.join(path, ".metadata")).storage_meta.checkpoint_id,
                      pathlib.PureWindowsPath)
    convert.convert(str(run), out=str(tmp_path / "m.pt"))
    assert (tmp_path / "m.pt").exists()


def test_metadata_claiming_more_bytes_than_its_files_is_damage(tmp_path, tiny):
    """Intact files whose metadata places an entry beyond the end of its .distcp: named as damage, and
    resume falls back to the older checkpoint (DCP would read, and convert allocate, by those numbers)."""
    _save(tmp_path, 1, tiny)
    path = _save(tmp_path, 2, tiny)

    def edit(md):
        next(iter(md.storage_data.values())).length += 1 << 40
    _edit_metadata(path, edit)
    assert "is truncated" in ckpt.damage(path) and ckpt.latest(str(tmp_path)).endswith("step_00000001")


def test_tensor_entry_holding_a_bomb_is_refused(tmp_path, tiny):
    """A .distcp tensor entry (a small torch zip DCP loads with torch.load) replaced by the shared-tuple bomb
    is walked before DCP reads it: UnsafeCheckpointError naming the file, no hang."""
    import hostile
    path = _save(tmp_path / "ck", 1, tiny)
    shard = os.path.join(path, "__0_0.distcp")
    offset = os.path.getsize(shard)
    bomb = hostile.torch_zip(hostile.shared_tuple_bomb())
    with open(shard, "ab") as f:
        f.write(bomb)

    def edit(md):
        info = md.storage_data[next(k for k in md.storage_data if k.fqn == _first_tensor(md))]
        info.offset, info.length = offset, len(bomb)
    _edit_metadata(path, edit)
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0.distcp at byte \d+ \(archive/data.pkl\): it expands"):
        ckpt.load(path, *_tiny())
