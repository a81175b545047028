"""The run folder's lifecycle: one process at a time, a fresh start after a crash, a failed start's config,
null metrics for all-skipped windows, a finished run left as it is, and the README's listing of it."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from test_pretrain_e2e import ENV, TINY

import mcf_fast.train.loop as loop
from mcf_fast.model import mcf as mcf_mod
from mcf_fast.train import runfolder
from mcf_fast.train.cli import parse_args
from mcf_fast.train.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(out, steps=4, *extra):
    cfg, _ = parse_args(["--out", str(out), "--max-steps", str(steps), *TINY, "--run.log_every", "1",
                         "--run.ckpt_every", "4", "--run.tensorboard", "false", "--run.export", "false", *extra])
    return cfg


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _poison(monkeypatch, bad_calls, exc=None):
    """Forward calls in `bad_calls` (0-based) return a NaN loss, or raise `exc` when given."""
    real, n = mcf_mod.MCFModel.forward, [0]

    def forward(self, *a, **kw):
        i, n[0] = n[0], n[0] + 1
        if i in bad_calls and exc is not None:
            raise exc
        out = real(self, *a, **kw)
        if i in bad_calls:
            out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(mcf_mod.MCFModel, "forward", forward)


def test_fresh_start_after_a_crash_before_any_checkpoint_rewrites_metrics(tmp_path, monkeypatch):
    """A run that died after writing rows 1, 2 but before its first checkpoint restarts from step 0
    with metrics.jsonl emptied: the rerun's rows are 1, 2, 3, 4 once each, not 1, 2, 1, 2, 3, 4."""
    out = tmp_path / "r"
    _poison(monkeypatch, {2}, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(_cfg(out))
    assert [r["step"] for r in _rows(out)] == [1, 2] and not (out / "checkpoints").exists()
    monkeypatch.undo()
    loop.train(_cfg(out))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def test_second_process_on_a_run_folder_is_refused(tmp_path):
    """While another process holds OUT/.lock a start fails naming its pid and writes nothing; once that
    process is SIGKILLed the OS has dropped the lock and the same start runs."""
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mcf_fast.train.runfolder import RunLock\n"
                               "RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another training process \(pid {holder.pid} on"):
            loop.train(_cfg(out))
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    loop.train(_cfg(out, 1))
    assert [r["step"] for r in _rows(out)] == [1]


def test_ranks_of_one_job_do_not_lock_each_other(tmp_path):
    """Only rank 0 takes the lock: another rank of the same job claims the folder while rank 0 holds it."""
    lock = runfolder.claim(str(tmp_path), Runtime(torch.device("cpu"), "fp32", 0, 1, 0))
    try:
        runfolder.claim(str(tmp_path), Runtime(torch.device("cpu"), "fp32", 1, 1, 1)).release()
        with pytest.raises(SystemExit, match="in use"):
            runfolder.RunLock(str(tmp_path))
    finally:
        lock.release()
    runfolder.RunLock(str(tmp_path)).release()  # released: free again


def test_failed_start_does_not_pin_its_config(tmp_path, monkeypatch):
    """A start that failed before any checkpoint (here: its data could not be read) leaves config.json;
    the corrected rerun is accepted; once a checkpoint exists another config is refused, files intact."""
    out = tmp_path / "r"

    def no_data(*a, **kw):
        raise FileNotFoundError("no shards match /data/typo-*.tar")
    monkeypatch.setattr(loop, "build_pretrain_loader", no_data)
    with pytest.raises(FileNotFoundError):
        loop.train(_cfg(out, 4, "--model.mask_ratio", "0.5"))
    assert json.load(open(out / "config.json"))["model"]["mask_ratio"] == 0.5
    monkeypatch.undo()
    loop.train(_cfg(out))
    saved = (out / "config.json").read_text()
    assert json.loads(saved)["model"]["mask_ratio"] == 0.75
    with pytest.raises(SystemExit, match="model.mask_ratio"):
        loop.train(_cfg(out, 4, "--model.mask_ratio", "0.5"))
    assert (out / "config.json").read_text() == saved


def test_all_skipped_window_has_null_losses(tmp_path, monkeypatch):
    """Metrics rows of windows where every step was non-finite carry null losses and grad norm (never a
    fake 0.0) and count the skipped steps; a partly skipped window averages its finite steps only."""
    out = tmp_path / "r"
    _poison(monkeypatch, {2, 3, 4})
    loop.train(_cfg(out, 6, "--run.log_every", "2"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(rows[1][k] is None for k in ("loss", "loss_perceptual", "loss_contrastive", "grad_norm"))
    assert '"loss": null' in (out / "metrics.jsonl").read_text().splitlines()[1]
    assert [r["skipped_in_window"] for r in rows] == [0, 2, 1]
    assert [r["skipped_nonfinite"] for r in rows] == [0, 2, 3]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in (rows[0], rows[2]))


def _snapshot(out):
    """(mtime, mode, sha256) of every file but .lock (which each process that opens the folder rewrites
    with its own pid)."""
    snap = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            if f == runfolder.LOCK_NAME:
                continue
            st = os.stat(p)
            snap[os.path.relpath(p, out)] = (st.st_mtime_ns, st.st_mode, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return snap


def test_finished_run_is_left_as_it_was(tmp_path, capsys):
    """Rerunning a finished run says 'already finished at step N (RUN/summary.json); nothing to do',
    returns the saved summary and touches no file; the export has the folder's file mode."""
    out = tmp_path / "r"
    cfg = _cfg(out, 2, "--run.export", "true", "--run.tensorboard", "true", "--run.vis_every", "1")
    first = loop.train(cfg)
    before = _snapshot(out)
    capsys.readouterr()
    again = loop.train(_cfg(out, 2, "--run.export", "true", "--run.tensorboard", "true", "--run.vis_every", "1"))
    err = capsys.readouterr().err
    assert f"already finished at step 2 ({out / 'summary.json'}); nothing to do" in err
    assert again == first and _snapshot(out) == before
    mode = lambda name: os.stat(out / name).st_mode & 0o777  # noqa: E731
    assert mode("encoder.safetensors") == mode("encoder.json") == mode("config.json")
    # the README's listing of a run folder names every entry a run writes, step numbers in 8 digits
    readme = open(os.path.join(ROOT, "README.md")).read()
    listing = readme[readme.index("runs/demo/\n"):]
    listing = listing[:listing.index("```")]
    named = {line.split()[0].split("/")[0] for line in listing.splitlines()[1:] if line.strip()}
    assert set(os.listdir(out)) <= named, set(os.listdir(out)) - named
    assert re.search(r"checkpoints/step_\d{8}/", listing) and re.search(r"recon_step\d{8}\.png", listing)
    assert sorted(os.listdir(out / "images")) == ["recon_latest.png", "recon_step00000001.png",
                                                  "recon_step00000002.png"]


def test_finished_run_with_an_allowed_config_change(tmp_path, capsys):
    """A finished run rerun with an allowed change of the same length does nothing and keeps summary.json;
    one that asks for more steps trains them and writes a new summary."""
    out = tmp_path / "r"
    loop.train(_cfg(out, 2))
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    loop.train(_cfg(out, 2, "--run.log_every", "2", "--run.allow_config_change", "true"))
    assert "already finished at step 2" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == summary
    longer = loop.train(_cfg(out, 3, "--run.allow_config_change", "true"))
    assert longer["steps"] == 3 and longer["resumed_from"] == 2
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    # killed after its last checkpoint but before its summary: the stale summary (step 2) is replaced
    (out / "summary.json").write_text(summary)
    fixed = loop.train(_cfg(out, 3, "--run.allow_config_change", "true"))
    assert fixed["steps"] == 3 and json.load(open(out / "summary.json"))["steps"] == 3


# --- a run folder that cannot serve: one line, exit 4, nothing overwritten through it ----------------
def _pretrain(out, capsys, *extra):
    """`pretrain` on `out` in this process: (exit code, the one stderr line)."""
    from test_pretrain_e2e import TINY

    from mcf_fast import pretrain
    capsys.readouterr()
    rc = pretrain.main(["--out", str(out), "--max-steps", "1", *TINY, "--run.tensorboard", "false",
                        "--run.export", "false", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return rc, err[-1]


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, capsys, link):
    """OUT/.lock as a symlink (or a hard link) to another file: refused by name, exit 4; the other file keeps
    its bytes (the lock used to write `pid N on host` through the link)."""
    out, victim = tmp_path / "r", tmp_path / "precious.txt"
    out.mkdir()
    victim.write_text("do not overwrite\n")
    (os.symlink if link == "symlink" else os.link)(victim, out / ".lock")
    rc, line = _pretrain(out, capsys)
    assert rc == 4 and ".lock" in line and ("is a symlink" if link == "symlink" else "hard links") in line
    assert victim.read_text() == "do not overwrite\n" and sorted(os.listdir(out)) == [".lock"]


def test_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    """--out under a file, or on a read-only file system (EROFS when the lock is created): exit 4, one line
    naming the folder and the fix."""
    (tmp_path / "file").write_text("x")
    rc, line = _pretrain(tmp_path / "file" / "run", capsys)
    assert rc == 4 and "cannot write in the run folder" in line and "choose a writable --out" in line
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", read_only)
    rc, line = _pretrain(tmp_path / "ro", capsys)
    assert rc == 4 and "Read-only file system" in line


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"model": 5}', "[" * 100_000])
def test_garbled_config_json_is_one_line_with_the_fix(tmp_path, capsys, text):
    """An empty (a crash before it reached the disk), garbled or deeply nested config.json: exit 4, one line
    naming the file and what to do, instead of a JSONDecodeError / RecursionError traceback."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(text)
    rc, line = _pretrain(out, capsys)
    assert rc == 4 and "config.json is empty or garbled" in line and "delete it and rerun" in line


def test_config_and_summary_are_written_atomically_and_durably(tmp_path, monkeypatch):
    """config.json and summary.json go through write_json: a temp file fsynced, renamed, the folder fsynced."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b))[1])
    out = tmp_path / "r"
    loop.train(_cfg(out, 1))
    for name in ("config.json", "summary.json"):
        p = str(out / name)
        i = calls.index(("replace", p))
        assert calls[i - 1] == ("fsync", p + ".tmp") and calls[i + 1] == ("fsync", str(out)), calls[i - 1:i + 2]
