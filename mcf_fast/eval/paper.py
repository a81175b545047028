"""`python -m mcf_fast.eval paper`: both downstream tasks of the paper from one checkpoint, one table.

    python -m mcf_fast.eval paper --encoder FILE --aflw19 DIR --lapa DIR --out OUT [--seeds K]

OUT/seed<S>/alignment and OUT/seed<S>/parsing are ordinary run folders (each resumes from its ckpt.pt),
one pair per seed S = --seed, --seed + 1, ... A task whose run finished with the same configuration and
the same encoder *content* (OUT/seed<S>/<task>/done.json) is not run again, so rerunning the command
after an interruption picks up where it stopped and ends with the same table; new weights at the same
path are evaluated afresh. OUT/paper.md and OUT/paper.json hold the table (`paper_table`): the best and
the last test evaluation of this checkpoint (mean +- sd over the seeds, and each run) against the MCF
paper and FaRL. Before any work the memory of both tasks is estimated (`memory`); on a CPU, without
--img-size / --batch-size, the encoder's own input size and a batch that fits are used instead of
FaRL's 448 px / 40, and the output says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shlex

from .config import EvalConfig
from .identity import encoder_digest, read_encoder_json

log = logging.getLogger(__name__)
# FaRL's epochs (trainers/aflw19_farl.yaml max_epoches 150, trainers/lapa_farl.yaml 300) and global batch
# (train_*_448_refinebb.yaml: batch_size 5 per GPU on FaRL's 8 GPUs).
FARL_EPOCHS = {"alignment": 150, "parsing": 300}
FARL_BATCH, FARL_INPUT = 40, 448
SHARED = ("encoder", "arch", "batch_size", "eval_batch_size", "workers", "device", "freeze_backbone", "head_width",
          "max_test", "log_every", "ckpt_every", "stop_after", "progress", "eval_every", "precision", "head_init",
          "ema_warmup", "warp_frame", "auc_grid", "absent_class", "memory_budget_gb")


def add_paper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="encoder.safetensors (or its folder), or 'random' with --arch")
    p.add_argument("--aflw19", required=True, help="AFLW-19 folder (AFLWinfo_release.mat + data/flickr/)")
    p.add_argument("--lapa", required=True, help="LaPa folder (train/, val/, test/ with images, labels, landmarks)")
    p.add_argument("--out", required=True, help="output folder: seed<S>/alignment, seed<S>/parsing, paper.md, "
                                                "paper.json")
    p.add_argument("--protocol", default="farl", choices=("farl", "simple"),
                   help="farl = FaRL's downstream protocol (default); simple = square-crop / resize-whole")
    p.add_argument("--arch", default="", help="architecture for --encoder random (preset or encoder.json)")
    p.add_argument("--img-size", type=int, default=None,
                   help="network input; default FaRL's 448 on a GPU, the encoder's own size on a CPU; 0 = the encoder's")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch; default FaRL's 40 (5 per GPU x 8) on a GPU, on a CPU the largest of 8/4/2 that fits")
    p.add_argument("--max-steps", type=int, default=0,
                   help="steps per task; 0 = FaRL's epochs (AFLW 150, LaPa 300) of the train set at --batch-size")
    p.add_argument("--seeds", type=int, default=1,
                   help="fine-tune each task K times (seeds --seed .. --seed+K-1); the table shows mean +- sd")
    p.add_argument("--eval-every", default="", help="score the test split: epoch (FaRL) | end | N steps; "
                                                    "'' = the protocol's")
    p.add_argument("--train-count", type=int, default=0, help="AFLW-19 faces that train (0 = the set's rule)")
    p.add_argument("--max-test", type=int, default=0, help="score only the first N test images (0 = all)")
    p.add_argument("--head-width", type=int, default=0, help="head channels (0 = the protocol's; FaRL 768)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    for name, what in (("precision", "fp32 | bf16 | auto"), ("head-init", "mmcv | torch"),
                       ("warp-frame", "blueprint | centre"), ("auc-grid", "farl | closed"),
                       ("absent-class", "nan | skip")):
        p.add_argument(f"--{name}", default="", help=f"{what}; '' = the protocol's (docs/evaluation.md)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp the EMA decay (ours); default the protocol's (FaRL: none)")
    p.add_argument("--memory-budget-gb", type=float, default=0.0,
                   help="refuse when the estimated peak exceeds this (0 = the memory available; < 0 = no check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-batch-size", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=0, help="stop each task after N steps (tests of resuming)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def paper_command(a: argparse.Namespace) -> str:
    """The `python -m mcf_fast.eval paper ...` that `a` came from (options left at their defaults omitted)."""
    p = argparse.ArgumentParser()
    add_paper_arguments(p)
    args = ["python", "-m", "mcf_fast.eval", "paper"]
    for act in p._actions:
        if not act.option_strings or act.dest == "help" or getattr(a, act.dest) == act.default:
            continue
        v, flag = getattr(a, act.dest), act.option_strings[0]
        if isinstance(act, argparse.BooleanOptionalAction):
            args.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, bool):
            args.append(flag)
        else:
            args += [flag, str(v)]
    return shlex.join(args)


def _device_is_cuda(name: str) -> bool:
    import torch
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def _configs(a: argparse.Namespace, seed: int, digest: str) -> dict[str, EvalConfig]:
    from .datasets import read_aflw19, read_lapa
    shared = {k: getattr(a, k) for k in SHARED}
    out = {}
    for task, data in (("alignment", a.aflw19), ("parsing", a.lapa)):
        protocol = a.protocol if a.protocol == "farl" else ("square-crop" if task == "alignment" else "resize-whole")
        steps = a.max_steps
        if steps <= 0:
            n = (len(read_aflw19(data, "train", a.train_count or None, check_images=False)) if task == "alignment"
                 else len(read_lapa(data, "train")))
            steps = FARL_EPOCHS[task] * math.ceil(n / a.batch_size)
        out[task] = EvalConfig(task=task, data=data, out=os.path.join(a.out, f"seed{seed}", task), protocol=protocol,
                               max_steps=steps, train_count=a.train_count if task == "alignment" else 0,
                               img_size=a.img_size, seed=seed, encoder_digest=digest, update_card=False,
                               **shared).validate()
    return out


def _arch(cfg: EvalConfig) -> dict:
    return dict(_encoder_arch(cfg.encoder, cfg.arch))


@functools.lru_cache(maxsize=4)
def _encoder_arch(encoder: str, arch: str) -> tuple:
    """The encoder's architecture, without building it where the files say it (export, preset); a foreign
    checkpoint is read once per process."""
    from .encoders import ARCH_KEYS, _is_export, build_encoder, parse_arch
    if encoder == "random":
        return tuple(parse_arch(arch).items())
    if _is_export(encoder):
        meta = read_encoder_json(encoder if os.path.isdir(encoder) else
                                 os.path.join(os.path.dirname(encoder) or ".", "encoder.json"))
        return tuple((k, meta[k]) for k in ARCH_KEYS)
    return tuple(build_encoder(encoder, arch or None, None, 0)[0].arch.items())


def _sizes(a: argparse.Namespace, digest: str) -> None:
    """Fill --img-size / --batch-size left unset: FaRL's on a GPU; on a CPU the encoder's size and a batch
    that fits (said in the output)."""
    from .memory import cpu_batch
    from .tasks import TASK_CLASSES
    cuda = _device_is_cuda(a.device)
    if a.img_size is None:
        a.img_size = FARL_INPUT if cuda else 0
    if a.batch_size is not None:
        return
    if cuda:
        a.batch_size = FARL_BATCH
        return
    a.batch_size = 2
    cfgs = _configs(argparse.Namespace(**{**vars(a), "max_steps": 1}), a.seed, digest)
    a.batch_size = min(cpu_batch(c.resolved(), _arch(c), TASK_CLASSES[t]) for t, c in cfgs.items())
    size = a.img_size or _arch(cfgs["alignment"])["img_size"]
    a.cpu_note = (f"on a CPU: --img-size {size} (the encoder's) and --batch-size {a.batch_size} (fits the memory "
                  f"available) instead of FaRL's {FARL_INPUT} px / batch {FARL_BATCH}; pass --img-size / "
                  "--batch-size to choose")
    print(a.cpu_note, flush=True)


def _preflight(cfgs: dict[str, EvalConfig]) -> None:
    """Both tasks' memory estimates before any work: the second task must not fail after the first ran."""
    from .memory import check_memory
    from .tasks import TASK_CLASSES
    for task, cfg in cfgs.items():
        check_memory(cfg.resolved(), _arch(cfg), TASK_CLASSES[task])


def _done(cfg: EvalConfig) -> dict | None:
    """The finished run's metrics when OUT/<task>/done.json records this configuration and encoder content."""
    path = os.path.join(cfg.out, "done.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done["metrics"] if done.get("fingerprint") == cfg.resolved().fingerprint() else None


def _other_weights(cfg: EvalConfig) -> str | None:
    """The encoder digest a task folder was trained from, when it is not the encoder's content now."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(os.path.join(cfg.out, "ckpt.pt")) or not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f).get("encoder_digest")
    return old if old and old != cfg.encoder_digest else None


def _run_task(cfg: EvalConfig) -> dict:
    from .runlog import atomic_json
    from .train import run
    old = _other_weights(cfg)
    if old:
        log.warning("%s was trained from other weights (sha256 %s..., now %s...): starting it over", cfg.out,
                    old[:16], cfg.encoder_digest[:16])
        cfg = dataclasses.replace(cfg, resume=False)
    m = run(cfg)
    if "stopped_at" not in m:
        atomic_json(os.path.join(cfg.out, "done.json"), {"fingerprint": cfg.resolved().fingerprint(), "metrics": m})
    return m


def _run_seeds(plans: dict[int, dict[str, EvalConfig]]) -> dict:
    """{seed: {task: metrics}} (finished tasks read back), or where a --stop-after stopped."""
    results: dict = {}
    for seed, cfgs in plans.items():
        results[seed] = {}
        for task, cfg in cfgs.items():
            m = _done(cfg) or _run_task(cfg)
            if "stopped_at" in m:
                return {"stopped_at": m["stopped_at"], "task": task, "seed": seed}
            results[seed][task] = m
    return results


def run_paper(a: argparse.Namespace) -> dict:
    """Every seed's two tasks (skipping finished ones), then the table; returns paper.json's content."""
    from .paper_table import REFERENCE, aggregate, card_block, paper_markdown
    from .runlog import atomic_json, run_log
    from .train import _device
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    _device(a.device)  # a --device that cannot run is named before sizes are picked for it
    digest = encoder_digest(a.encoder, a.arch)
    command = paper_command(a)
    _sizes(a, digest)
    seeds = [a.seed + i for i in range(a.seeds)]
    plans = {s: _configs(a, s, digest) for s in seeds}
    _preflight(plans[seeds[0]])
    os.makedirs(a.out, exist_ok=True)
    with run_log(a.out):  # OUT/eval.log: the whole command's story; each task folder keeps its own too
        log.info("paper %s: seeds %s; %s", a.out, seeds, command)
        if getattr(a, "cpu_note", ""):
            log.info(a.cpu_note)
        results = _run_seeds(plans)
    if "stopped_at" in results:
        return results
    first = results[seeds[0]]
    table = {"encoder": a.encoder, "encoder_sha256": digest, "protocol": a.protocol, "seeds": seeds,
             "choices": plans[seeds[0]]["alignment"].choices(), "eval_every": first["alignment"]["run"]["eval_every"],
             "units": "NME_diag x100 (lower better), F1 x100 (higher better)", "rows": aggregate(results),
             "reference": REFERENCE, "runs": {t: r["run"] for t, r in first.items()},
             "test_faces": {t: r["num_images"] for t, r in first.items()}, "command": command,
             "out": os.path.abspath(a.out)}
    table["this"] = [table["rows"]["best"][t]["mean"] for t in ("alignment", "parsing")]
    atomic_json(os.path.join(a.out, "paper.json"), table)
    with open(os.path.join(a.out, "paper.md"), "w") as f:
        f.write(paper_markdown(table))
    if a.encoder != "random":
        from mcf_fast.model.card import add_eval_scores
        add_eval_scores(a.encoder.partition("#")[0], f"paper {os.path.abspath(a.out)}", card_block(table), digest)
    return table
