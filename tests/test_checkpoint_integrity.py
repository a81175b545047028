"""Checkpoints that are verified, durable and recoverable: digests in COMPLETE, fallback past damaged or
non-finite ones, fsync before the rename, garbled markers, leftover rotation, disk-full messages."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import pytest
import torch

from mcf_fast.train import checkpoint as ckpt
from mcf_fast.train import ckpt_integrity as integ
from mcf_fast.train.checkpoint import CheckpointError


def _tiny():
    """A small MCF model (the e2e TINY sizes) with one fused-AdamW step taken, so optimizer state exists."""
    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train.optim import build_optimizer
    torch.manual_seed(0)
    model = MCFModel(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2, proj_hidden=64, proj_dim=16, teacher="random",
                     teacher_arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                     teacher_layers=(0, 1), teacher_num_heads=2)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), torch.device("cpu"))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture
def ckpt_log():
    """Messages the checkpoint module logs (a handler on its own logger: training sets propagate=False on
    'mcf_fast', which would hide them from pytest's log capture)."""
    msgs: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: msgs.append(record.getMessage())
    logger = logging.getLogger(ckpt.__name__)
    logger.addHandler(handler)
    yield msgs
    logger.removeHandler(handler)


def _save(d, step, tiny, keep_last=3, finite=True):
    model, opt = tiny
    return ckpt.save(str(d), step, model, opt, {"step": step, "rng_cpu": torch.get_rng_state()}, keep_last, finite)


def _distcp(path):
    return os.path.join(path, next(n for n in os.listdir(path) if n.endswith(".distcp")))


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


DAMAGE = {
    "truncated .distcp": lambda p: _truncate(_distcp(p)),
    "deleted .distcp": lambda p: os.remove(_distcp(p)),
    "deleted .metadata": lambda p: os.remove(os.path.join(p, ".metadata")),
    "garbled .metadata": lambda p: open(os.path.join(p, ".metadata"), "wb").write(b"\x80\x04garbage"),
    "truncated extra_rank0.pt": lambda p: _truncate(os.path.join(p, "extra_rank0.pt")),
    "deleted COMPLETE": lambda p: os.remove(os.path.join(p, "COMPLETE")),
    "garbled COMPLETE": lambda p: open(os.path.join(p, "COMPLETE"), "w").write("{not json"),
}


def test_marker_records_size_and_sha256_of_every_file(tmp_path, tiny):
    """COMPLETE lists every other file in the folder with its byte count and SHA-256 (what sha256sum prints)."""
    import hashlib
    path = _save(tmp_path, 1, tiny)
    files = ckpt.read_marker(path)["files"]
    assert set(files) == set(os.listdir(path)) - {"COMPLETE"}
    for name, rec in files.items():
        data = open(os.path.join(path, name), "rb").read()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.damage(path) is None


def test_save_load_round_trip_is_exact(tmp_path, tiny):
    """Through the safe reader and planner, model and optimizer state come back bit-identical."""
    path = _save(tmp_path, 1, tiny)
    model2, opt2 = _tiny()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    extra = ckpt.load(path, model2, opt2)
    model, opt = tiny
    assert extra["step"] == 1
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if not k.startswith("perceptual."))
    o, o2 = opt.state_dict(), opt2.state_dict()
    assert o["param_groups"] == o2["param_groups"]
    assert all(torch.equal(o["state"][i][k], o2["state"][i][k]) for i in o["state"] for k in o["state"][i])


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_falls_back_to_intact_and_says_why(tmp_path, tiny, kind, ckpt_log):
    """A damaged newest checkpoint is named with its reason and resume falls back to the newest intact one."""
    _save(tmp_path, 1, tiny)
    newest = _save(tmp_path, 2, tiny)
    DAMAGE[kind](newest)
    assert ckpt.latest(str(tmp_path)) == os.path.join(str(tmp_path), "step_00000001")
    msg = " ".join(ckpt_log)
    assert "step_00000002 is damaged" in msg and "falling back to" in msg and "step_00000001" in msg
    with pytest.raises(CheckpointError, match="step_00000002"):
        ckpt.load(newest, *_tiny())


def test_bit_flip_is_detected_by_the_digest(tmp_path, tiny):
    """One flipped bit inside a .distcp (same size, still a valid zip) is refused, not resumed silently."""
    _save(tmp_path, 1, tiny)
    newest = _save(tmp_path, 2, tiny)
    p = _distcp(newest)
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    assert "does not match its sha256" in ckpt.damage(newest)
    assert ckpt.latest(str(tmp_path)).endswith("step_00000001")


def test_legacy_checkpoint_without_digests_gets_structural_checks(tmp_path, tiny):
    """A COMPLETE from before digests ({step, world_size, finite}) still loads; a truncated shard in it is caught."""
    path = _save(tmp_path, 1, tiny)
    with open(os.path.join(path, "COMPLETE"), "w") as f:
        json.dump({"step": 1, "world_size": 1, "finite": True}, f)
    assert ckpt.damage(path) is None
    ckpt.load(path, *_tiny())
    _truncate(_distcp(path))
    assert "truncated" in ckpt.damage(path)


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path, tiny):
    """Checkpoints exist but none is intact: a CheckpointError listing each and why, nothing deleted."""
    for s in (1, 2):
        _truncate(_distcp(_save(tmp_path, s, tiny)))
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be resumed.*step_00000001.*truncated"):
        ckpt.latest(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]
    assert ckpt.latest(str(tmp_path / "nothing-here")) is None


def test_resume_skips_non_finite_checkpoints_and_names_both(tmp_path, tiny, ckpt_log):
    """After a divergence the newest finite checkpoint is resumed, with a log line naming both."""
    _save(tmp_path, 4, tiny)
    _save(tmp_path, 8, tiny, finite=False)
    assert ckpt.latest(str(tmp_path)).endswith("step_00000004")
    line = next(m for m in ckpt_log if "non-finite" in m)
    assert "step_00000008" in line and "step_00000004" in line


def test_only_non_finite_checkpoints_is_an_error(tmp_path, tiny):
    """If every intact checkpoint is non-finite, resume refuses (it would stop again) instead of starting over."""
    _save(tmp_path, 4, tiny, finite=False)
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.latest(str(tmp_path))
    assert ckpt.latest(str(tmp_path), finite_only=True) is None


def test_every_file_and_both_folders_are_fsynced_before_and_after_the_rename(tmp_path, tiny, monkeypatch):
    """Data files, COMPLETE and the step folder are fsynced before the rename; the parent folder after it."""
    synced, at_rename = [], {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        at_rename[os.path.realpath(src)] = list(synced)
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = _save(tmp_path, 1, tiny)
    tmp = os.path.realpath(final + ".tmp")
    before = at_rename[tmp]
    for name in os.listdir(final):
        assert os.path.join(tmp, name) in before, name
    assert tmp in before and before.index(tmp) > before.index(os.path.join(tmp, "COMPLETE"))
    assert os.path.realpath(str(tmp_path)) in synced[len(before):]


def test_garbled_marker_in_an_older_checkpoint_does_not_break_saving(tmp_path, tiny):
    """An empty COMPLETE in an old kept checkpoint counts as incomplete: later saves rotate it away."""
    first = _save(tmp_path, 1, tiny, keep_last=2)
    _save(tmp_path, 2, tiny, keep_last=2)
    open(os.path.join(first, "COMPLETE"), "w").close()
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [2]
    _save(tmp_path, 3, tiny, keep_last=2)
    _save(tmp_path, 4, tiny, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]


def test_kill_between_rename_and_rotation_is_tidied_on_resume(tmp_path, tiny, monkeypatch):
    """keep_last+1 checkpoints and a .tmp left by a killed run are tidied when the run resumes (load)."""
    for s in (1, 2):
        _save(tmp_path, s, tiny, keep_last=2)

    real = ckpt._rotate

    def killed(d, *a, **k):  # the kill lands after step 3's rename, before its rotation
        if os.path.exists(os.path.join(d, "step_00000003")):
            raise KeyboardInterrupt
        return real(d, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(ckpt, "_rotate", killed)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 3, tiny, keep_last=2)
    os.makedirs(tmp_path / "step_00000004.tmp")  # and a save killed mid-write
    assert len(os.listdir(tmp_path)) == 4
    ckpt.load(ckpt.latest(str(tmp_path)), *_tiny())
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000003"]


def _fail_extra_write(real, disk):
    """torch.save that fills the disk while writing extra_rank0.pt, as the C++ zip writer reports it."""
    def save(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("extra_rank0.pt"):
            disk["full"] = True
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4992 vs 4880")
        return real(obj, f, *a, **k)
    return save


def _fail_dcp_write(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["precheck", "dcp ENOSPC", "zip writer"])
def test_disk_full_gives_a_clear_message_and_keeps_intact_checkpoints(tmp_path, tiny, monkeypatch, how):
    """No space (seen before writing, or as ENOSPC / the zip writer's 'unexpected pos' mid-write): a one-line
    'no space left on DEVICE (PATH): N MB needed', the partial folder removed, the older checkpoint intact."""
    import torch.distributed.checkpoint.filesystem as dcp_fs
    good = _save(tmp_path, 1, tiny)
    usage, disk = shutil.disk_usage(str(tmp_path)), {"full": how == "precheck"}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=(1 << 20) if disk["full"] else 1 << 40))
    if how == "dcp ENOSPC":
        monkeypatch.setattr(dcp_fs, "_write_item", _fail_dcp_write)
    elif how == "zip writer":
        monkeypatch.setattr(torch, "save", _fail_extra_write(torch.save, disk))
    with pytest.raises(CheckpointError, match=r"^no space left on \S+ \(.*\): \d+ MB needed") as e:
        _save(tmp_path, 2, tiny)
    assert "\n" not in str(e.value) and "kept" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    assert ckpt.damage(good) is None and ckpt.latest(str(tmp_path)) == good


def test_zip_writer_error_with_free_space_is_not_called_disk_full(tmp_path, tiny, monkeypatch):
    """'unexpected pos' while the disk still has room is reported as a write failure, not as a full disk."""
    monkeypatch.setattr(torch, "save", _fail_extra_write(torch.save, {}))
    with pytest.raises(CheckpointError, match=r"writing checkpoint .* failed on rank 0 \(RuntimeError: .*unexpected pos"):
        _save(tmp_path, 1, tiny)
    assert os.listdir(tmp_path) == []


def test_other_write_errors_name_the_checkpoint(tmp_path, tiny, monkeypatch):
    """A write failure that is not a full disk still names the checkpoint, removes its partial folder."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(dcp_fs, "_write_item", denied)
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step_00000001 failed on rank 0 .*Permission"):
        _save(tmp_path, 1, tiny)
    assert os.listdir(tmp_path) == []


def test_estimate_is_close_to_what_is_written(tmp_path, tiny):
    """The free-space estimate is within 25% above the bytes a save really writes (never far below)."""
    model, opt = tiny
    state = {"model": ckpt._model_sd(model), "optim": ckpt.get_optimizer_state_dict(model, opt)}
    path = _save(tmp_path, 1, tiny)
    written = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    est = integ.estimate_bytes(state)
    assert 0.95 * written <= est <= 1.25 * written, (est, written)


# ---- two ranks: every rank hashes its own files, rank 0 gathers them into COMPLETE

def _dist_worker(rank, world, out):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    ckpt.save(out, 1, model, opt, {"step": 1, "rank": rank}, 2, True)
    extra = ckpt.load(os.path.join(out, "step_00000001"), model, opt)
    assert extra["rank"] == rank


@pytest.mark.slow  # on the session's two ranks (conftest's two_ranks), started once for every distributed test
def test_two_ranks_gather_their_digests_into_one_marker(tmp_path, two_ranks):
    """With 2 ranks each rank's shard and extra file is recorded in COMPLETE; a flip in rank 1's shard is caught."""
    two_ranks.run(_dist_worker, str(tmp_path))
    path = str(tmp_path / "step_00000001")
    files = ckpt.read_marker(path)["files"]
    assert {"__0_0.distcp", "__1_0.distcp", "extra_rank0.pt", "extra_rank1.pt", ".metadata"} <= set(files)
    assert ckpt.damage(path) is None
    p = os.path.join(path, "__1_0.distcp")
    with open(p, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    assert "__1_0.distcp does not match" in ckpt.damage(path)


def test_rerun_after_divergence_resumes_from_the_last_finite_checkpoint(tmp_path, monkeypatch, ckpt_log):
    """Weights go NaN after step 4, step 8's checkpoint is non-finite and the guard stops the run; the rerun
    resumes from step 4 (saying so, naming step 8) and finishes instead of stopping again."""
    from test_pretrain_e2e import TINY

    from mcf_fast.model import mcf as mcf_mod
    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import NonFiniteError, train
    cfg, _ = parse_args(["--out", str(tmp_path / "r"), "--max-steps", "12", *TINY, "--run.log_every", "2",
                         "--run.ckpt_every", "4", "--run.max_nonfinite", "4", "--run.keep_last", "3",
                         "--run.tensorboard", "false", "--run.export", "false", "--run.vis_every", "0"])
    real, calls = mcf_mod.MCFModel.forward, {"n": 0}

    def diverging(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: the weights themselves become NaN (not only one loss)
            with torch.no_grad():
                self.encoder.cls_token.fill_(float("nan"))
        return real(self, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(mcf_mod.MCFModel, "forward", diverging)
        with pytest.raises(NonFiniteError):
            train(cfg)
    ck = tmp_path / "r" / "checkpoints"
    assert ckpt.read_marker(str(ck / "step_00000008"))["finite"] is False
    summary = train(cfg)
    assert summary["steps"] == 12 and summary["resumed_from"] == 4
    assert any("step_00000008 holds non-finite weights" in x and "step_00000004" in x for x in ckpt_log)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink out", "fifo"])
def test_complete_may_name_only_plain_files_in_its_folder(tmp_path, tiny, how):
    """A COMPLETE naming ../FILE, /abs/FILE, a symlink out of the folder or a FIFO is damage, named, and the
    file is never opened (a 200 GB file outside would have been hashed; a FIFO would block for ever)."""
    import threading
    path = _save(tmp_path / "ck", 1, tiny)
    outside = tmp_path / "outside.bin"
    with open(outside, "wb") as f:
        f.truncate(200 << 30)  # sparse: 200 GB that cost no disk
    name = {"dotdot": "../../outside.bin", "absolute": str(outside), "symlink out": "link", "fifo": "pipe"}[how]
    if how == "symlink out":
        os.symlink(outside, os.path.join(path, "link"))
    if how == "fifo":
        os.mkfifo(os.path.join(path, "pipe"))
    m = json.load(open(os.path.join(path, "COMPLETE")))
    m["files"][name] = {"bytes": 200 << 30, "sha256": "0" * 64}
    json.dump(m, open(os.path.join(path, "COMPLETE"), "w"))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("why", ckpt.damage(path)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "damage() opened what COMPLETE named"
    assert "COMPLETE names" in box["why"] or "not a regular file" in box["why"], box["why"]


def test_deeply_nested_complete_is_garbled_not_a_traceback(tmp_path, tiny):
    """A COMPLETE of 100000 nested brackets reads as a garbled marker (RecursionError caught), named."""
    path = _save(tmp_path, 1, tiny)
    open(os.path.join(path, "COMPLETE"), "w").write("[" * 100_000 + "]" * 100_000)
    assert "empty or garbled" in ckpt.damage(path)
