"""What the kit measures, stated once: the pre-training command line and the step suite's configurations.

The steps that run them (items.py) and the cost sheet's prediction of them (predict.py) both read these,
so the sheet always plans exactly what the run measures.
"""
from __future__ import annotations

# The step suite's configurations on the GPU, at a pinned batch: its largest CUDA batch, which a GPU
# reaches within the time box anyway; pinned so that the sheet predicts the very batch measured.
STEP_CONFIGS = (("vit-s", "bf16"), ("vit-b-paper", "bf16"))
STEP_BATCH = 64


def pretrain_args(teacher: str, run_dir: str) -> list[str]:
    """The arguments of `python -m mcf_fast.pretrain` in the kit's pretrain step: vit-b-paper (batch 64 x
    accum 8), synthetic faces, bf16, 12 optimizer steps, on one GPU, with `teacher` as --model.teacher."""
    return ["--preset", "vit-b-paper", "--model.teacher", teacher, "--device", "cuda", "--run.precision", "bf16",
            "--max-steps", "12", "--optim.warmup_steps", "2", "--run.log_every", "1", "--run.ckpt_every", "1000000",
            "--out", run_dir]


def step_suite_args() -> list[str]:
    """The step suite's options (after `python -m benchmarks.run --suite step`)."""
    return ["--step-configs", ",".join(f"{p}:{q}" for p, q in STEP_CONFIGS), "--step-batch", str(STEP_BATCH)]


def step_config(preset: str, precision: str):
    """The config the step suite's engine step runs for (preset, precision): the benchmarks' preset config
    at STEP_BATCH, one micro-batch, no clipping, seed 0 (as step_child.TimedTrainStep sets them)."""
    from ..engine import preset_config
    cfg = preset_config(preset)
    cfg.optim.batch_size, cfg.optim.accum_steps, cfg.optim.clip_grad, cfg.run.seed = STEP_BATCH, 1, 0.0, 0
    cfg.run.precision = precision
    return cfg


__all__ = ["STEP_CONFIGS", "STEP_BATCH", "pretrain_args", "step_suite_args", "step_config"]
