"""End-to-end multi-rank training on CPU (gloo): 2 ranks x B/2 == 1 rank x B, resume across world
sizes, SIGKILL of one rank and relaunch of the same torchrun command.

Run as a script, this file is the training worker (torchrun launches it; the session's two ranks and
this process call the same `_worker`): the real `train()` runs, with the data loader replaced by
`GlobalSlice`, which builds the single-rank loader at the global batch and hands rank r its r-th
slice. That pins down the data order the equivalence needs (the single-rank batch is the
concatenation of the ranks' batches in rank order, so the contrastive labels `arange(N) + N * rank`
refer to the same keys), and its position does not depend on the world size. The production
loader's split is tested by the data helper's own tests.

Only the SIGKILL test starts torchrun (its rank must die and the same command must resume); the other
2-rank runs go to conftest's `two_ranks` and the 1-rank runs happen in this process: an interpreter
start imports torch, which costs more than these 5-step runs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GLOBAL_BATCH = 8
STEPS = 5
TINY = ["--preset", "demo", "--model.img_size", "32", "--model.patch_size", "8", "--model.embed_dim", "32",
        "--model.depth", "2", "--model.num_heads", "2", "--model.decoder_embed_dim", "32",
        "--model.decoder_depth", "1", "--model.decoder_num_heads", "2", "--model.proj_hidden", "64",
        "--model.proj_dim", "32", "--model.teacher_img_size", "32", "--model.teacher_patch_size", "8",
        "--model.teacher_embed_dim", "32", "--model.teacher_depth", "2", "--model.teacher_num_heads", "2",
        "--model.teacher_layers", "0,1", "--data.synthetic_size", "128", "--run.precision", "fp32",
        "--run.threads", "1", "--run.log_every", "1", "--run.ckpt_every", "2", "--run.keep_last", "5",
        "--run.tensorboard", "false", "--run.progress", "none", "--run.export", "false",
        "--optim.lr", "5e-4", "--optim.warmup_steps", "2", "--optim.clip_grad", "1.0",
        "--max-steps", str(STEPS)]


# ----------------------------------------------------------------------------------- the worker
class GlobalSlice:
    """The world-size-1 loader at the global batch; yields this rank's contiguous slice of each batch."""

    def __init__(self, inner, rank: int, world: int, kill_file: str):
        self.inner, self.rank, self.world, self.kill_file = inner, rank, world, kill_file
        self.steps_per_epoch = inner.steps_per_epoch
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        from mcf_fast.data.loader import Batch
        if os.path.exists(self.kill_file):  # "RANK STEP": die there, once (the fault test)
            with open(self.kill_file) as f:
                rank, at = map(int, f.read().split())
            start = self.inner.state_dict()["step"]
            if rank == self.rank and start == at:
                os.remove(self.kill_file)
                os.kill(os.getpid(), signal.SIGKILL)
        b = next(self.inner)
        n = b.images.shape[0] // self.world
        sl = slice(self.rank * n, (self.rank + 1) * n)
        return Batch(b.images[sl], b.sample_ids[sl])

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()


def _worker(argv: list[str]) -> int:
    """pretrain's main with GlobalSlice as the loader, at this world size's per-rank batch."""
    import mcf_fast.train.loop as loop
    from mcf_fast import pretrain
    from mcf_fast.data import build_pretrain_loader

    world = int(os.environ.get("WORLD_SIZE", "1"))

    def build(cfg, *, batch_size, rank, world_size, seed, device):
        inner = build_pretrain_loader(cfg, batch_size=batch_size * world_size, rank=0, world_size=1, seed=seed,
                                      device=device)
        return GlobalSlice(inner, rank, world_size, os.path.join(out, "kill_at"))

    out = argv[argv.index("--out") + 1]
    real, loop.build_pretrain_loader = loop.build_pretrain_loader, build
    try:
        return pretrain.main(argv + ["--batch-size", str(GLOBAL_BATCH // world)])
    finally:
        loop.build_pretrain_loader = real


def _rank_worker(rank: int, world: int, argv: list[str]) -> int:
    return _worker(argv)


# ----------------------------------------------------------------------------------- the tests
def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def launch(out: str, ranks: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone` with `ranks` workers: the user's command shape."""
    script = [os.path.abspath(__file__), "--out", out, *TINY, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def train_runs(pool, out: str, ranks: int, *extra: str) -> None:
    """The same run without starting an interpreter: 1 rank in this process, 2 on the session's ranks."""
    argv = ["--out", out, *TINY, *extra]
    if ranks == 2:
        assert pool.run(_rank_worker, argv) == [0, 0]
        return
    from runners import main_here
    assert "WORLD_SIZE" not in os.environ, "a 1-rank run here needs WORLD_SIZE unset"
    rc, err = main_here(_worker, argv)
    assert rc == 0, err[-6000:]


def rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_state(out: str, step: int = STEPS) -> dict:
    from mcf_fast.convert import load_model_state
    return load_model_state(os.path.join(out, "checkpoints", f"step_{step:08d}"))


def keep_only(src: str, dst: str, step: int) -> None:
    """Copy a run folder with only the checkpoint of `step` (as if it had stopped right after it)."""
    shutil.copytree(src, dst)
    for name in os.listdir(os.path.join(dst, "checkpoints")):
        if name != f"step_{step:08d}":
            shutil.rmtree(os.path.join(dst, "checkpoints", name))


LOSS_KEYS = ("loss", "loss_perceptual", "loss_contrastive", "grad_norm")


def assert_rows_close(a: list[dict], b: list[dict], rtol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in LOSS_KEYS:
            assert abs(ra[k] - rb[k]) <= rtol * abs(rb[k]), (ra["step"], k, ra[k], rb[k])


def max_param_diff(sa: dict, sb: dict) -> float:
    """Largest |a - b| over all floating tensors, the attention key biases excepted (see below)."""
    assert sa.keys() == sb.keys()
    worst = 0.0
    for k in sa:
        a, b = sa[k].double(), sb[k].double()
        if not a.is_floating_point():
            assert torch.equal(a, b), k
            continue
        if k.endswith("attn.qkv.bias"):
            # The key bias adds q.b_k to every logit of a row, which softmax ignores: its gradient is
            # zero in exact arithmetic and rounding noise in practice, and AdamW scales noise up to
            # ~lr per step, differently in each run. Compare the query and value biases only.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        worst = max(worst, float((a - b).abs().max()))
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, two_ranks):
    base = tmp_path_factory.mktemp("dist")
    r1, r2 = str(base / "one"), str(base / "two")
    train_runs(two_ranks, r1, 1)
    train_runs(two_ranks, r2, 2, "--run.export", "true")  # the 2-rank run also gathers and exports its encoder
    return base, r1, r2


# Parameters after 5 AdamW steps (updates ~1e-3 each) agree to ~2.4e-7 when measured (2-core CPU,
# 2026-11-26); a gradient averaged wrongly (e.g. summed, or a BatchNorm not synced) moves them by 1e-4.
PARAM_ATOL = 2e-6


def test_two_ranks_match_one_rank(runs):
    """2 ranks x B/2 and 1 rank x B (same global samples, fp32): losses agree per step to 1e-5 relative
    and every parameter, buffer and EMA tensor agrees after 5 steps."""
    _, r1, r2 = runs
    a, b = rows(r2), rows(r1)
    assert len(b) == STEPS
    assert_rows_close(a, b, 1e-5)
    assert max_param_diff(final_state(r2), final_state(r1)) < PARAM_ATOL


def test_resume_at_other_world_size(runs, two_ranks):
    """A 2-rank checkpoint resumed by 1 rank (and a 1-rank one by 2 ranks) continues the same run:
    DCP re-shards model and optimizer, loss rows and final parameters match the uninterrupted run."""
    base, r1, r2 = runs
    # The 1 -> 2 resume also runs the non-default FSDP2 modes (sharded teacher, no reshard after
    # forward): neither may change the numbers.
    modes = ["--dist.teacher_sharding", "shard", "--dist.reshard_after_forward", "false"]
    for src, ranks, name, extra in ((r2, 1, "two_then_one", []), (r1, 2, "one_then_two", modes)):
        dst = str(base / name)
        keep_only(src, dst, 2)
        # per-rank batch changes with the world
        train_runs(two_ranks, dst, ranks, "--run.allow_config_change", "true", *extra)
        assert_rows_close(rows(dst), rows(src), 1e-5)
        assert max_param_diff(final_state(dst), final_state(src)) < PARAM_ATOL


def test_sigkill_one_rank_then_relaunch(runs):
    """SIGKILL rank 1 after the step-4 checkpoint; a half-written step-5 folder is left behind; the same
    torchrun command resumes from step 4 and writes the loss rows of the uninterrupted run."""
    base, _, r2 = runs
    out = str(base / "killed")
    os.makedirs(out)
    with open(os.path.join(out, "kill_at"), "w") as f:
        f.write("1 4")  # rank 1 dies fetching the batch of step index 4, after checkpoint step_4
    p = launch(out, 2, check=False)
    assert p.returncode != 0, "the killed run should fail"
    assert not os.path.exists(os.path.join(out, "kill_at"))
    ck = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ck)) == ["step_00000002", "step_00000004"]
    os.makedirs(os.path.join(ck, "step_00000005"))  # a checkpoint that never got its COMPLETE marker
    open(os.path.join(ck, "step_00000005", "__0_0.distcp"), "w").close()
    launch(out, 2)
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["resumed_from"] == 4
    assert_rows_close(rows(out), rows(r2), 1e-6)
    assert max_param_diff(final_state(out), final_state(r2)) < 1e-6


def test_convert_from_any_world_size(runs, tmp_path):
    """`python -m mcf_fast.convert` turns 1- and 2-rank checkpoints into one state-dict file and an
    encoder export; the 2-rank export equals the encoder the run gathered itself (full_encoder)."""
    from safetensors.torch import load_file

    from mcf_fast import convert
    from mcf_fast.model.vit import load_encoder
    _, r1, r2 = runs
    for run in (r1, r2):
        out, enc = str(tmp_path / (os.path.basename(run) + ".safetensors")), str(tmp_path / os.path.basename(run))
        assert convert.main([run, "--out", out, "--encoder", enc]) == 0
        sd, ref = load_file(out), final_state(run)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
        vit = load_encoder(enc)
        assert all(torch.equal(v, ref["encoder." + k]) for k, v in vit.state_dict().items())
    gathered = load_encoder(r2).state_dict()
    assert all(torch.equal(v, gathered[k]) for k, v in vit.state_dict().items())


def test_convert_refuses_half_written(tmp_path):
    """A checkpoint folder without COMPLETE is refused with a message naming the problem."""
    from mcf_fast import convert
    bad = tmp_path / "checkpoints" / "step_00000003"
    bad.mkdir(parents=True)
    (bad / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="half-written"):
        convert.convert(str(bad), out=str(tmp_path / "x.pt"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        convert.convert(str(tmp_path), out=str(tmp_path / "x.pt"))


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
