"""Run configuration of a downstream evaluation, one field per CLI flag."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

TASKS = ("alignment", "parsing")
PROTOCOLS = {"alignment": ("farl", "square-crop"), "parsing": ("farl", "resize-whole")}
# How FaRL computes a score where ours differs (each choice's FaRL file is in docs/evaluation.md and beside
# the code that implements it); under --protocol farl every one is FaRL's, and each stays selectable.
FARL_CHOICES = dict(precision="fp32", head_init="mmcv", ema_warmup=False, warp_frame="blueprint", auc_grid="farl",
                    absent_class="nan", eval_every="epoch")
OUR_CHOICES = dict(precision="auto", head_init="torch", ema_warmup=True, warp_frame="centre", auc_grid="closed",
                   absent_class="skip", eval_every="end")
CHOICES = dict(precision=("fp32", "bf16", "auto"), head_init=("mmcv", "torch"), warp_frame=("blueprint", "centre"),
               auc_grid=("farl", "closed"), absent_class=("nan", "skip"))
# FaRL's values (farl/experiments/face_{alignment,parsing}/optimizers/refine_backbone.yaml, trainers/*.yaml),
# then the simple protocols'. Fields left at their sentinel take these.
PROTOCOL_DEFAULTS = {
    ("farl", "alignment"): dict(lr=1e-2, backbone_lr_scale=0.01, weight_decay=1e-5, layer_decay=1.0, warmup_steps=0,
                                schedule="step", clip_grad=0.0, ema_decay=0.999, head_width=768, warp_factor=0.0,
                                heatmap_weight=1.0, **FARL_CHOICES),
    ("farl", "parsing"): dict(lr=1e-3, backbone_lr_scale=0.1, weight_decay=1e-5, layer_decay=1.0, warmup_steps=0,
                              schedule="step", clip_grad=0.0, ema_decay=0.999, head_width=768, warp_factor=0.8,
                              heatmap_weight=1.0, **FARL_CHOICES),
    ("simple", ""): dict(lr=5e-4, backbone_lr_scale=1.0, weight_decay=0.05, layer_decay=0.75, warmup_steps=-1,
                         schedule="cosine", clip_grad=1.0, ema_decay=0.0, head_width=128, warp_factor=0.0,
                         heatmap_weight=0.1, **OUR_CHOICES),
}
SENTINELS = dict(lr=0.0, backbone_lr_scale=0.0, weight_decay=-1.0, layer_decay=0.0, warmup_steps=-1, schedule="",
                 clip_grad=-1.0, ema_decay=-1.0, head_width=0, warp_factor=-1.0, heatmap_weight=-1.0, precision="",
                 head_init="", ema_warmup=None, warp_frame="", auc_grid="", absent_class="", eval_every="")
# Fields that do not change what a run computes; a resumed run may change them freely.
NOT_FINGERPRINTED = {"out", "workers", "device", "log_every", "ckpt_every", "num_viz", "resume",
                     "eval_batch_size", "stop_after", "progress", "memory_budget_gb", "update_card"}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    task: str = _f("alignment", "alignment (AFLW-19, heatmaps + soft-argmax) or parsing (LaPa, 11 classes)")
    data: str = _f("", "dataset folder in the real layout (AFLWinfo_release.mat + data/flickr/, or LaPa's "
                       "train/val/test)")
    encoder: str = _f("", "encoder.safetensors (or its folder) from pre-training, or 'random'")
    out: str = _f("", "output folder: metrics.json, metrics.md, predictions.png, metrics.jsonl, ckpt.pt")
    arch: str = _f("", "architecture for --encoder random: preset (vit-tiny, vit_small_patch16_224, ...) or "
                       "an encoder.json; pass the pre-trained encoder.json for a fair baseline")
    protocol: str = _f("farl", "farl = FaRL's protocol (AFLW: box -> input; LaPa: 5-landmark alignment + tanh warp; "
                               "FaRL's head, losses, optimiser, EMA, augmentations); resize-whole (parsing) / "
                               "square-crop (alignment) = the simple protocols: whole image squeezed, or a square "
                               "crop of crop_scale x the box, with the light FPN head")
    img_size: int = _f(0, "network input size (FaRL: 448); 0 = the encoder's pre-training size")
    batch_size: int = _f(16, "training batch size (FaRL: 5 per GPU on 8 GPUs = 40)")
    eval_batch_size: int = _f(0, "test batch size; 0 = --batch-size")
    max_steps: int = _f(1000, "optimizer steps")
    lr: float = _f(0.0, "peak learning rate of the head (the encoder gets lr x --backbone-lr-scale, then layer "
                        "decay); 0 = the protocol's: farl alignment 1e-2, parsing 1e-3; simple 5e-4")
    backbone_lr_scale: float = _f(0.0, "encoder lr / head lr; 0 = the protocol's: farl alignment 0.01, parsing "
                                       "0.1 (both 1e-4 absolute); simple 1")
    weight_decay: float = _f(-1.0, "AdamW weight decay; -1 = the protocol's: farl 1e-5 on every parameter; simple "
                                   "0.05, not on biases, norms, tokens")
    layer_decay: float = _f(0.0, "MAE layer-wise LR decay factor in (0, 1]; 0 = the protocol's: farl 1 (none), "
                                 "simple 0.75")
    warmup_steps: int = _f(-1, "linear warm-up steps; -1 = the protocol's: farl 0, simple 5% of --max-steps")
    schedule: str = _f("", "step (FaRL: x0.1 at epoch 200 of 300 for LaPa, i.e. at 2/3 of the steps; never for "
                           "AFLW's 150 epochs) | cosine; '' = the protocol's (farl step, simple cosine)")
    clip_grad: float = _f(-1.0, "gradient-norm clip; 0 = off; -1 = the protocol's (farl off, simple 1.0)")
    ema_decay: float = _f(-1.0, "score an exponential moving average of the weights with this decay; 0 = off; "
                                "-1 = the protocol's (farl 0.999, simple off)")
    freeze_backbone: bool = _f(False, "train the head only (the encoder runs without gradients)")
    head_width: int = _f(0, "channels of the dense head; 0 = the protocol's (farl 768 = FaRL's head_channel, "
                            "simple 128)")
    seed: int = _f(0, "seed of head init, scratch encoder, sample order and augmentation")
    augment: bool = _f(True, "random geometry (+ FaRL's colour augmentations under farl) of training inputs",
                       negatable=True)
    warp_factor: float = _f(-1.0, "farl: tanh-warp factor (FaRL: LaPa 0.8, AFLW 0); -1 = FaRL's")
    crop_scale: float = _f(1.2, "square-crop alignment: crop side = crop_scale * max(box w, box h)")
    heatmap_weight: float = _f(-1.0, "alignment: weight of the heatmap loss added to the coordinate loss "
                                     "(farl: BCE on sigmoid heatmaps, 1.0; simple: Gaussian cross-entropy, 0.1); "
                                     "-1 = the protocol's, 0 = coordinates only")
    train_count: int = _f(0, "alignment: faces of `ra` that train (real set: 20000); 0 = split.json in "
                             "--data or the real rule's proportion")
    eval_split: str = _f("test", "alignment: test | frontal; parsing: test | val")
    max_test: int = _f(0, "score only the first N test images (quick looks); 0 = all")
    workers: int = _f(2, "data-loading worker processes (0 = in the main process)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = _f(10, "steps between metrics.jsonl lines")
    ckpt_every: int = _f(200, "steps between checkpoints (always one at the end)")
    num_viz: int = _f(8, "test images drawn in predictions.png")
    resume: bool = _f(True, "continue from OUT/ckpt.pt when it exists", negatable=True)
    stop_after: int = _f(0, "stop (with a checkpoint, no scoring) after this many steps; the schedule "
                            "still follows --max-steps; 0 = off (for tests of resuming)")
    progress: bool = _f(True, "show a progress bar", negatable=True)
    eval_every: str = _f("", "score the test split during training: epoch (FaRL: after every epoch) | end (only "
                             "after the last step) | N (every N steps); the last step is always scored and both "
                             "the last and the best score are reported; '' = the protocol's (farl epoch, simple end)")
    precision: str = _f("", "fp32 | bf16 (autocast) | auto (bf16 on a GPU, fp32 on a CPU); '' = the protocol's: "
                            "farl fp32 (FaRL fine-tunes in fp32: enable_amp False), simple auto")
    head_init: str = _f("", "farl head's conv init: mmcv (Kaiming-normal fan_out on every conv+BN+ReLU block, as "
                            "mmcv's ConvModule) | torch (PyTorch's default); '' = the protocol's")
    ema_warmup: bool = _f(None, "ramp the EMA decay as min(decay, (1+t)/(10+t)); FaRL has none (decay from step 0, "
                                "BN buffers averaged too); default: the protocol's (farl off)", negatable=True)
    warp_frame: str = _f("", "tanh-warp frame: blueprint (pixel centres / 512, FaRL) | centre ((x + 0.5) / 512, "
                             "symmetric); '' = the protocol's")
    auc_grid: str = _f("", "AUC/FR grid: farl (np.arange(0, 0.0701, 1e-4), failures above 0.0701, FaRL) | closed "
                           "([0, 0.07], failures above 0.07); '' = the protocol's")
    absent_class: str = _f("", "parsing: a class absent from the test labels and predictions makes f1_mean NaN "
                               "(nan, FaRL) or is left out of the mean (skip); '' = the protocol's")
    memory_budget_gb: float = _f(0.0, "refuse before any work when the estimated peak memory exceeds this; "
                                      "0 = the memory available now; < 0 = no check")
    encoder_digest: str = _f("", "sha256 of the encoder's files (filled in by the run: changed weights at the "
                                 "same path are a different configuration)", cli=False)
    update_card: bool = _f(True, "write the scores into the encoder's MODEL_CARD.md (`paper` writes its table "
                                 "there instead)", cli=False)

    def resolved(self) -> "EvalConfig":
        """A copy with every field left at its sentinel set to the protocol's value (see PROTOCOL_DEFAULTS)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.protocol not in PROTOCOLS[self.task]:
            raise ValueError(f"--protocol for {self.task} must be one of {PROTOCOLS[self.task]}, got {self.protocol!r}")
        key = ("farl", self.task) if self.protocol == "farl" else ("simple", "")
        vals = {k: v for k, v in PROTOCOL_DEFAULTS[key].items() if getattr(self, k) == SENTINELS[k]}
        out = dataclasses.replace(self, **vals)
        if out.warmup_steps < 0:  # simple protocol: 5% of the steps
            out.warmup_steps = max(1, out.max_steps // 20)
        return out

    def choices(self) -> dict:
        """The resolved value of every choice where FaRL's computation and ours differ, and whose it is."""
        r = self.resolved()
        return {k: (getattr(r, k), "FaRL" if getattr(r, k) == v else "ours") for k, v in FARL_CHOICES.items()}

    def validate(self) -> "EvalConfig":
        def bad(msg):
            raise ValueError(msg)
        if self.task not in TASKS:
            bad(f"task must be one of {TASKS}, got {self.task!r}")
        if self.protocol not in PROTOCOLS[self.task]:
            bad(f"--protocol for {self.task} must be one of {PROTOCOLS[self.task]}, got {self.protocol!r}")
        for name in ("data", "encoder", "out"):
            if not getattr(self, name):
                bad(f"--{name.replace('_', '-')} is required")
        for name in ("batch_size", "max_steps"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        r = self.resolved()
        if r.lr <= 0 or r.weight_decay < 0 or not 0 < r.layer_decay <= 1 or r.backbone_lr_scale <= 0:
            bad(f"need lr > 0, weight_decay >= 0, 0 < layer_decay <= 1, backbone_lr_scale > 0; got {r.lr}, "
                f"{r.weight_decay}, {r.layer_decay}, {r.backbone_lr_scale}")
        if r.head_width < 1 or r.schedule not in ("step", "cosine") or not 0 <= r.ema_decay < 1:
            bad(f"need --head-width >= 1, --schedule step|cosine, 0 <= --ema-decay < 1; got {r.head_width}, "
                f"{r.schedule!r}, {r.ema_decay}")
        if self.protocol == "farl" and self.batch_size < 2:
            bad("--protocol farl needs --batch-size >= 2 (FaRL's head uses batch norm, as FaRL's SyncBN)")
        if not 0 <= r.warp_factor < 1:
            bad(f"--warp-factor must lie in [0, 1) (0 = plain similarity warp), got {r.warp_factor}")
        if self.img_size < 0 or self.crop_scale <= 0 or r.heatmap_weight < 0:
            bad("--img-size, --crop-scale and --heatmap-weight must not be negative (crop scale > 0)")
        splits = ("test", "frontal") if self.task == "alignment" else ("test", "val")
        if self.eval_split not in splits:
            bad(f"--eval-split for {self.task} must be one of {splits}, got {self.eval_split!r}")
        for name, ok in CHOICES.items():
            if getattr(r, name) not in ok:
                bad(f"--{name.replace('_', '-')} must be one of {', '.join(ok)}, got {getattr(r, name)!r}")
        if r.head_init == "mmcv" and self.protocol != "farl":
            bad("--head-init mmcv applies to FaRL's head: use it with --protocol farl")
        eval_every_steps(r.eval_every, 1)  # raises on a malformed value
        return self

    def fingerprint(self) -> dict:
        """What a run computes from: every field that changes it, the encoder's content digest included."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}


def eval_every_steps(spec: str, steps_per_epoch: int) -> int:
    """--eval-every as a step interval: epoch -> steps per epoch, end -> 0 (the last step only), N -> N."""
    if spec == "epoch":
        return max(1, steps_per_epoch)
    if spec == "end":
        return 0
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--eval-every must be epoch, end or a number of steps >= 1, got {spec!r}")
    return n


def _flag_value(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def command_line(cfg: EvalConfig) -> str:
    """The shortest `python -m mcf_fast.eval TASK ...` that runs `cfg` again: every field that differs from
    both its default and its protocol's value (a protocol default is implied by --protocol)."""
    import shlex
    key = ("farl", cfg.task) if cfg.protocol == "farl" else ("simple", "")
    implied = PROTOCOL_DEFAULTS[key]
    args = ["python", "-m", "mcf_fast.eval", cfg.task]
    for f in fields(EvalConfig):
        v = getattr(cfg, f.name)
        if f.name == "task" or f.metadata.get("cli") is False or v == f.default:
            continue
        if f.name in implied and v == implied[f.name]:
            continue
        if f.name == "warmup_steps" and cfg.protocol != "farl" and v == max(1, cfg.max_steps // 20):
            continue  # the simple protocol's 5% of the steps
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, _flag_value(v)]
    return shlex.join(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field (task is the sub-command)."""
    for f in fields(EvalConfig):
        if f.name == "task" or f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata["help"].replace("%", "%%")
        if f.type in ("bool", bool):
            if f.metadata.get("negatable"):
                p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=h)
            else:
                p.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, help=h + f" (default: {f.default!r})")
