"""Step memory of vit-s with and without activation checkpointing, and the loss (identical in every
setting: checkpointing changes memory, not math).

    python -m benchmarks.memory_ckpt [--batch 8] [--threads N]

For each setting (none, the teacher's blocks checkpointed, the teacher's and the model's own) one model
is built, and one forward + backward is measured with the harness: the model's state bytes and the
step's peak above it (CPU: the resident-set high-water mark of that call alone, see harness.peak_bytes),
and its time. Settings run one after another in this process; each model is freed before the next.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.memory_ckpt\n")
    raise SystemExit(2)

import gc  # noqa: E402

from .cli import Parser  # noqa: E402

SETTINGS = {"default": (False, False), "teacher_grad_ckpt": (True, False), "both": (True, True)}


def one(name: str, batch: int) -> dict:
    """{'state_mib', 'step_mib', 'ms', 'loss'} of one forward + backward of vit-s in setting `name`."""
    import torch

    from mcf_fast.masking import random_masks

    from .engine import build_model, preset_config
    from .harness import measure, peak_bytes, state_bytes
    cfg = preset_config("vit-s")
    cfg.model.teacher_grad_ckpt, cfg.model.grad_ckpt = SETTINGS[name]
    m = build_model(cfg.model, 0)
    imgs = torch.randn(batch, 3, 224, 224)
    mk = random_masks(batch, m.encoder.num_patches, 0.75, views=2, seed=0, step=0, sample_ids=torch.arange(batch))
    losses = []

    def step():
        m.zero_grad(set_to_none=True)
        out = m(imgs, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1])
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    res = {"state_mib": state_bytes(m) / 2**20, "step_mib": (peak_bytes(step) or 0) / 2**20}
    m.zero_grad(set_to_none=True)
    res.update(ms=measure({"step": step}, warmup=0, reps=1)["step"][0], loss=losses[-1])
    return res


def main(argv=None) -> int:
    ap = Parser(__doc__, "python -m benchmarks.memory_ckpt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.batch < 2 or a.threads < 0:
        ap.error("--batch must be >= 2 (the heads' BatchNorm needs 2 samples), --threads >= 0")
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    for name in SETTINGS:
        r = one(name, a.batch)
        gc.collect()  # the setting's model is gone before the next one is built
        print(f"{name:18s} state {r['state_mib']:6.0f} MiB  step peak above state {r['step_mib']:6.0f} MiB  "
              f"fwd+bwd {r['ms'] / 1e3:5.1f} s  loss {r['loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
