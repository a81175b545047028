"""Step memory of vit-s with and without activation checkpointing (one process per setting).

    python benchmarks/memory_ckpt.py            # runs the three settings, one subprocess each
Prints the peak RSS of one forward+backward above the resident state (the harness's CPU method),
the time, and the loss (identical in every setting: checkpointing changes memory, not math).
"""
import resource
import subprocess
import sys
import time

SETTINGS = {"default": (False, False), "teacher_grad_ckpt": (True, False), "both": (True, True)}


def one(name: str, batch: int = 8) -> None:
    import torch

    from mcf_fast.masking import random_masks
    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train.config import from_preset
    cfg = from_preset("vit-s")
    cfg.model.teacher_grad_ckpt, cfg.model.grad_ckpt = SETTINGS[name]
    m = MCFModel.from_config(cfg.model, seed=0)
    imgs = torch.randn(batch, 3, 224, 224)
    L = m.encoder.num_patches
    mk = random_masks(batch, L, 0.75, views=2, seed=0, step=0, sample_ids=torch.arange(batch))
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (Linux: KiB)
    before, t = rss(), time.perf_counter()
    out = m(imgs, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1])
    out.loss.backward()
    print(f"{name:18s} state {before:6.0f} MiB  step peak above state {rss() - before:6.0f} MiB  "
          f"fwd+bwd {time.perf_counter() - t:5.1f} s  loss {out.loss.item():.4f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1])
    else:
        for name in SETTINGS:  # fresh processes: ru_maxrss only grows
            subprocess.run([sys.executable, __file__, name], check=True)
