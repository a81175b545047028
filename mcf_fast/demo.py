"""The demo: MCF as a real user runs it, on synthetic faces, on a CPU, in minutes.

    python -m mcf_fast.pretrain                       # no arguments: this demo, into runs/demo
    python -m mcf_fast.demo [--out DIR] [--seed N] [--teacher-steps N] [--steps N] [--threads N]

MCF needs a frozen *pre-trained* teacher and, in the paper's recipe, a decoder that starts from an
MAE checkpoint. Nothing can be downloaded here, so the demo makes both the way they were made for
the paper, only smaller:
1. teacher stage (OUT/teacher): MAE pre-training (pixel loss on the removed patches, no contrastive
   term) of a ViT of the demo's size; its checkpoint is converted to OUT/teacher/mae.safetensors.
2. MCF stage (OUT): `--model.teacher checkpoint:OUT/teacher/mae.safetensors` (the frozen MAE encoder
   judges the decoder's image through its feature maps) and `--model.decoder_init` the same file
   (MAE's decoder as the starting point), with the MoCo v3 contrastive loss between two masks.
3. summary: on fixed held-out faces, the masked-patch error of both stages' reconstructions against
   the per-image mean-colour baseline; and linear probes (`mcf_fast.eval.probe`) of the exported
   encoder against a random-init encoder of the same architecture. Written to OUT/demo_summary.json.
Both stages are ordinary `train(cfg)` runs: rerunning the command resumes each where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

TEACHER_LAYERS = (0, 2, 4)  # of the 6-block demo teacher, every other block (the paper: 2,5,8,11 of 12); the
# teacher pass stops after block 4, which saves a sixth of the teacher's cost, the largest in the step
BLR = 4e-3  # lr 5e-4 at batch 32: the preset's 1.5e-3 (lr 1.9e-4) learns too little in a few hundred steps
HELDOUT_N = 64


def _shrunk(overrides: dict | None):
    """The demo preset with `overrides` ({'model': {...}, 'data': {...}}, for tests) applied."""
    from mcf_fast.train.config import from_preset
    cfg = from_preset("demo")
    for sec, vals in (overrides or {}).items():
        for k, v in vals.items():
            setattr(getattr(cfg, sec), k, v)
    return cfg


def stage_configs(out: str, seed: int, teacher_steps: int, steps: int, threads: int, overrides: dict | None = None):
    """(teacher-stage Config, MCF-stage Config); paths inside `out`. The MCF stage is validated once its
    teacher file exists."""
    t = _shrunk(overrides)
    t.model.teacher, t.model.perceptual_weight, t.model.contrastive_weight = "pixel", 1.0, 0.0
    t.optim.max_steps, t.optim.warmup_steps, t.optim.blr = teacher_steps, max(1, teacher_steps // 10), BLR
    t.run.out, t.run.seed, t.run.threads = os.path.join(out, "teacher"), seed, threads
    t.run.ckpt_every = t.run.vis_every = max(1, teacher_steps // 2)
    m = _shrunk(overrides)
    ckpt = os.path.join(out, "teacher", "mae.safetensors")
    m.model.teacher, m.model.decoder_init = f"checkpoint:{ckpt}", ckpt
    m.model.teacher_num_heads = t.model.num_heads
    m.model.teacher_layers = tuple(i for i in TEACHER_LAYERS if i < t.model.depth) or (t.model.depth - 1,)
    m.optim.max_steps, m.optim.warmup_steps, m.optim.blr = steps, max(1, steps // 10), BLR
    m.run.out, m.run.seed, m.run.threads = out, seed, threads
    m.run.ckpt_every = m.run.vis_every = max(1, steps // 3)
    t.validate()
    return t, m


def load_trained(cfg):
    """The MCFModel of a finished run, from its newest complete checkpoint (frozen teacher rebuilt)."""
    from mcf_fast.convert import load_model_state, resolve_checkpoint
    from mcf_fast.model.checkpoints import check_fit
    from mcf_fast.model.mcf import MCFModel
    model = MCFModel.from_config(cfg.model, seed=cfg.run.seed)
    sd = load_model_state(resolve_checkpoint(cfg.run.out))
    check_fit(model.state_dict(), sd, f"the checkpoint of {cfg.run.out}", ignore_missing=("perceptual.",))
    model.load_state_dict(sd, strict=False)
    return model.eval()


def recon_report(cfg) -> dict:
    """Masked-patch error of the run's reconstructions of HELDOUT_N fixed held-out faces, with baselines."""
    from mcf_fast.train.heldout import heldout_faces, heldout_masks, pixel_errors, reconstruct
    model = load_trained(cfg)
    m = cfg.model
    imgs = heldout_faces(cfg.run.seed, HELDOUT_N, m.img_size, cfg.data.mean, cfg.data.std)
    ids_keep, ids_restore, mask = heldout_masks(HELDOUT_N, (m.img_size // m.patch_size) ** 2, m.mask_ratio)
    pred = reconstruct(model, imgs, ids_keep, ids_restore)
    return pixel_errors(imgs, pred, mask, m.patch_size, cfg.data.mean, cfg.data.std)


def probe_report(run_out: str, seed: int, sizes=(480, 240)) -> dict:
    """Linear probes of the exported encoder and of a random-init one (same architecture, seed `seed`)."""
    from mcf_fast.eval.probe import probe, random_encoder
    from mcf_fast.model.vit import load_encoder
    enc = load_encoder(os.path.join(run_out, "encoder.safetensors"))
    return {"pretrained": probe(enc, *sizes), "random_init": probe(random_encoder(enc.arch, seed), *sizes)}


def _change(frac: float, good: str, bad: str) -> str:
    """'14.5% lower' or, when the pre-trained encoder is worse, '3.0% higher (worse)'."""
    return f"{100 * frac:.1f}% {good}" if frac >= 0 else f"{-100 * frac:.1f}% {bad} (worse)"


def summary_table(s: dict) -> str:
    r_t, r_m, p = s["recon_teacher"], s["recon_mcf"], s["probe"]
    pre, rnd = p["pretrained"], p["random_init"]
    lines = [
        "demo summary (held-out faces never trained on; error = MSE on removed patches, 0..1 RGB)",
        f"  {'':34s}{'masked-patch error':>20s}{'mean-colour baseline':>22s}{'high-freq ratio':>17s}",
        f"  {'teacher stage (MAE pixel loss)':34s}{r_t['masked_mse']:>20.4f}{r_t['mean_colour_mse']:>22.4f}"
        f"{r_t['hf_ratio']:>17.2f}",
        f"  {'MCF stage (teacher features)':34s}{r_m['masked_mse']:>20.4f}{r_m['mean_colour_mse']:>22.4f}"
        f"{r_m['hf_ratio']:>17.2f}",
        "linear probes on frozen patch tokens (synthetic AFLW-19 / LaPa labels)",
        f"  {'':34s}{'NME_diag (lower)':>20s}{'F1 mean (higher)':>22s}",
        f"  {'MCF encoder (this run)':34s}{pre['nme_diag']:>20.4f}{pre['f1_mean']:>22.4f}",
        f"  {'random-init encoder':34s}{rnd['nme_diag']:>20.4f}{rnd['f1_mean']:>22.4f}",
        f"  gain over scratch: NME_diag {_change(1 - pre['nme_diag'] / rnd['nme_diag'], 'lower', 'higher')}, "
        f"F1 {pre['f1_mean'] - rnd['f1_mean']:+.4f}",
        f"reconstruction below the mean-colour baseline: {'yes' if s['recon_below_baseline'] else 'NO'}; "
        f"encoder better than scratch on both probes: {'yes' if s['beats_scratch'] else 'NO'}",
    ]
    m = s.get("ran_on")
    if m:  # summaries written before this field existed have no machine line
        lines.append(f"ran on: {m['cpu']} ({m['cores']} cores), {m['device']}, {m['precision']} ({m['why']}), "
                     f"torch {m['torch']}")
    return "\n".join(lines)


def ran_on(cfg) -> dict:
    """Where the numbers came from: the CPU, its cores, the precision the run chose and why, torch."""
    import platform

    import torch

    from mcf_fast.train.runtime import resolve_precision
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.device("cuda" if cfg.run.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    precision, why = resolve_precision(cfg.run.precision, device)
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device.type, "precision": precision, "why": why,
            "torch": torch.__version__}


def run_demo(out: str = "runs/demo", seed: int = 0, teacher_steps: int = 300, steps: int = 150,
             threads: int = 0, *, overrides: dict | None = None, probe_sizes=(480, 240)) -> dict:
    """Both stages, then the summary; returns it (also written to OUT/demo_summary.json and printed).
    `overrides` and `probe_sizes` shrink it for tests."""
    from mcf_fast.convert import convert
    from mcf_fast.train.checks import check_inputs
    from mcf_fast.train.loop import train
    t0 = time.perf_counter()
    tcfg, mcfg = stage_configs(out, seed, teacher_steps, steps, threads, overrides)
    log = logging.getLogger("mcf_fast")
    print(f"demo, stage 1 of 2: MAE teacher ({teacher_steps} steps, pixel loss) -> {tcfg.run.out}", file=sys.stderr)
    train(tcfg)
    ckpt = mcfg.model.decoder_init
    convert(tcfg.run.out, out=ckpt)
    print(f"demo, stage 2 of 2: MCF ({steps} steps) against the frozen teacher {ckpt}", file=sys.stderr)
    mcfg.validate()
    check_inputs(mcfg)  # the teacher file now exists: its depth against the layers, as the CLI checks
    train(mcfg)
    log.info("demo: measuring held-out reconstructions and linear probes")
    s = {"seed": seed, "teacher_steps": teacher_steps, "steps": steps,
         "recon_teacher": recon_report(tcfg), "recon_mcf": recon_report(mcfg),
         "probe": probe_report(out, seed, probe_sizes)}
    pre, rnd = s["probe"]["pretrained"], s["probe"]["random_init"]
    s["recon_below_baseline"] = s["recon_mcf"]["masked_mse"] < s["recon_mcf"]["mean_colour_mse"]
    s["beats_scratch"] = pre["nme_diag"] < rnd["nme_diag"] and pre["f1_mean"] > rnd["f1_mean"]
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    s["ran_on"] = ran_on(mcfg)
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    print(summary_table(s) + f"\nwall clock {s['wall_s']:.0f} s; pictures: {out}/images/recon_*.png (MCF), "
          f"{tcfg.run.out}/images/recon_*.png (teacher); numbers: {out}/demo_summary.json")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcf_fast.demo", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--out", default="runs/demo", help="run folder (the teacher stage goes to OUT/teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, masks and initialisation")
    p.add_argument("--teacher-steps", type=int, default=300, help="MAE teacher-stage optimizer steps")
    p.add_argument("--steps", type=int, default=150, help="MCF-stage optimizer steps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    a = p.parse_args(argv)
    if a.teacher_steps < 1 or a.steps < 1 or a.threads < 0 or a.seed < 0:
        p.error("--teacher-steps and --steps must be >= 1, --threads and --seed >= 0")
    try:
        run_demo(a.out, a.seed, a.teacher_steps, a.steps, a.threads)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the stage said where it stopped; rerunning resumes
        from mcf_fast.train.interrupt import exit_status
        return exit_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
