"""End to end: `python -m mcf_fast.pretrain` trains, writes a self-explaining run folder, and resumes exactly.

Three interpreter starts in all (each imports torch): the 20-step run, which the kill-and-resume test
also takes as its uninterrupted reference, and the killed run and its rerun. They run in the background
from the session's start (tests/background.py), so this module runs last. Reruns that train nothing (a
finished run, a changed config) call the same CLI main in this process."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import background
import pytest
import torch

TINY = ["--model.img_size", "32", "--model.patch_size", "8", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
        "--model.decoder_num_heads", "2", "--model.proj_hidden", "64", "--model.proj_dim", "16",
        "--model.teacher_img_size", "32", "--model.teacher_patch_size", "8", "--model.teacher_embed_dim", "32",
        "--model.teacher_depth", "2", "--model.teacher_num_heads", "2", "--model.teacher_layers", "0,1",
        "--optim.batch_size", "8", "--data.synthetic_size", "64", "--optim.warmup_steps", "2",
        "--optim.lr", "1e-3", "--run.progress", "lines", "--run.threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(out, *extra, steps=20):
    return [sys.executable, "-m", "mcf_fast.pretrain", "--out", str(out), "--max-steps", str(steps), *TINY, *extra]


def _main_here(out, *extra, steps=20):
    """The same command as _run, through pretrain's main in this process: (exit status, stderr)."""
    from runners import main_here

    from mcf_fast import pretrain
    return main_here(pretrain.main, ["--out", str(out), "--max-steps", str(steps), *TINY, *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


RUN_ARGS = ("--run.log_every", "2", "--run.ckpt_every", "10", "--run.vis_every", "10")
pytestmark = pytest.mark.late  # (see the module docstring)


def _finished_run(out: str) -> tuple:
    return pathlib.Path(out), background.run(_cmd(out, *RUN_ARGS), timeout=600, env=ENV)


def _killed_then_rerun(out: str) -> dict:
    """The same 20-step command, SIGKILLed once its step-10 checkpoint is complete, then run again."""
    marker = pathlib.Path(out) / "checkpoints" / "step_00000010" / "COMPLETE"
    p = background.popen(_cmd(out, *RUN_ARGS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    started = time.monotonic()
    while not marker.exists() and p.poll() is None and not background.overdue(started, 300):
        time.sleep(0.05)
    seen = {"out": pathlib.Path(out), "checkpointed": marker.exists()}
    p.send_signal(signal.SIGKILL)
    p.communicate()
    seen["finished_before_kill"] = os.path.exists(os.path.join(out, "encoder.safetensors"))
    seen["rerun"] = background.run(_cmd(out, *RUN_ARGS), timeout=600, env=ENV)
    return seen


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the runs are queued in the background."""
    if items is None or any("finished" in i.fixturenames for i in items):
        background.start("e2e_finished", _finished_run, os.path.join(background.workdir(), "e2e", "run"), cost=5)
    if items is None or any(i.name == "test_kill_and_resume_matches_uninterrupted" for i in items):
        background.start("e2e_killed", _killed_then_rerun, os.path.join(background.workdir(), "e2e", "killed"),
                         cost=10)


@pytest.fixture(scope="module")
def finished():
    """The 20-step run (its folder and its process), shared by the tests below; none of them changes it."""
    start_background(None)  # (already started by conftest)
    return background.result("e2e_finished")


def test_run_trains_and_writes_everything(finished):
    """A 20-step CPU run lowers the loss and leaves config, metrics, events, checkpoint, grid and export."""
    out, r = finished
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert [row["step"] for row in rows] == list(range(2, 21, 2))
    for key in ("step", "loss", "loss_perceptual", "loss_contrastive", "lr", "momentum", "images_per_s",
                "step_time_s", "data_time_s", "peak_mem_mb", "skipped_nonfinite", "data_skipped"):
        assert key in rows[0], key
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    assert json.load(open(out / "config.json"))["model"]["depth"] == 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    ck = sorted(os.listdir(out / "checkpoints"))
    assert ck == ["step_00000010", "step_00000020"] and os.path.exists(out / "checkpoints" / ck[-1] / "COMPLETE")
    assert os.path.exists(out / "images" / "recon_latest.png") and os.path.exists(out / "images" / "recon_step00000010.png")
    from safetensors.torch import load_file
    enc = load_file(str(out / "encoder.safetensors"))
    assert "patch_embed.proj.weight" in enc and "blocks.1.mlp.fc2.weight" in enc
    assert not any(k.startswith(("decoder", "mask_token", "target", "perceptual", "projector", "predictor"))
                   for k in enc)
    meta = json.load(open(out / "encoder.json"))
    assert meta["embed_dim"] == 32 and meta["depth"] == 2
    assert "resum" not in r.stderr.lower()
    # Rerunning a finished run says so and trains nothing more (tests/test_run_folder.py: files untouched).
    rc, err = _main_here(out, *RUN_ARGS)
    assert rc == 0 and "already finished at step 20" in err
    assert _rows(out) == rows


def test_exported_encoder_loads_into_timm(tmp_path):
    """encoder.safetensors loads strictly into timm's VisionTransformer of the same architecture."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from mcf_fast.model.vit import VisionTransformer, load_encoder, save_encoder
    v = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    save_encoder(v, str(tmp_path))
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                          embed_dim=64, depth=2, num_heads=2)
    m.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    ours = load_encoder(str(tmp_path)).eval()
    torch.testing.assert_close(m.forward_features(x), ours.forward_features(x), rtol=1e-4, atol=1e-5)


def test_changed_config_on_resume_is_refused(finished):
    """Reusing a run folder with another config is an error that names the difference."""
    out, r = finished
    assert r.returncode == 0, r.stderr[-3000:]
    rc, err = _main_here(out, *RUN_ARGS, "--model.mask_ratio", "0.5")
    assert rc != 0 and "model.mask_ratio" in err


def test_kill_and_resume_matches_uninterrupted(finished):
    """SIGKILL after a checkpoint, rerun the same command: metrics rows equal an uninterrupted run's."""
    ref, r = finished
    assert r.returncode == 0, r.stderr[-3000:]
    start_background(None)  # (already started by conftest)
    seen = background.result("e2e_killed")
    assert seen["checkpointed"], "no checkpoint at step 10 before the deadline"
    assert not seen["finished_before_kill"], "the run finished before it was killed"
    r = seen["rerun"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step_00000010" in r.stderr
    keys = ("step", "loss", "loss_perceptual", "loss_contrastive", "grad_norm", "lr", "momentum")
    a = [{k: row[k] for k in keys} for row in _rows(ref)]
    b = [{k: row[k] for k in keys} for row in _rows(seen["out"])]
    assert a == b
