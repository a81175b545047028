"""Run configuration of a downstream evaluation, one field per CLI flag."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

TASKS = ("alignment", "parsing")
# Fields that do not change what a run computes; a resumed run may change them freely.
NOT_FINGERPRINTED = {"out", "workers", "device", "log_every", "ckpt_every", "num_viz", "resume",
                     "eval_batch_size", "stop_after", "progress"}


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
    img_size: int = _f(0, "network input size (FaRL: 448); 0 = the encoder's pre-training size")
    batch_size: int = _f(16, "training batch size")
    eval_batch_size: int = _f(0, "test batch size; 0 = --batch-size")
    max_steps: int = _f(1000, "optimizer steps")
    lr: float = _f(5e-4, "peak learning rate (head; block i gets lr * layer_decay^(depth - i))")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, tokens)")
    layer_decay: float = _f(0.75, "MAE layer-wise LR decay factor in (0, 1]")
    warmup_steps: int = _f(-1, "linear warm-up steps before the cosine decay; -1 = 5% of --max-steps")
    clip_grad: float = _f(1.0, "gradient-norm clip; 0 = off")
    freeze_backbone: bool = _f(False, "train the head only (the encoder runs without gradients)")
    head_width: int = _f(128, "channels of the dense head")
    seed: int = _f(0, "seed of head init, scratch encoder, sample order and augmentation")
    augment: bool = _f(True, "random zoom / shift / rotation of training crops", negatable=True)
    crop_scale: float = _f(1.2, "alignment: crop side = crop_scale * max(box w, box h)")
    heatmap_weight: float = _f(0.1, "alignment: weight of the Gaussian heatmap cross-entropy added to the "
                                    "coordinate L1 loss (0 = coordinates only)")
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

    def validate(self) -> "EvalConfig":
        def bad(msg):
            raise ValueError(msg)
        if self.task not in TASKS:
            bad(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("data", "encoder", "out"):
            if not getattr(self, name):
                bad(f"--{name.replace('_', '-')} is required")
        for name in ("batch_size", "max_steps", "head_width"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.layer_decay <= 1:
            bad(f"need lr > 0, weight_decay >= 0, 0 < layer_decay <= 1; got {self.lr}, {self.weight_decay}, "
                f"{self.layer_decay}")
        if self.img_size < 0 or self.crop_scale <= 0 or self.heatmap_weight < 0:
            bad("--img-size, --crop-scale and --heatmap-weight must not be negative (crop scale > 0)")
        splits = ("test", "frontal") if self.task == "alignment" else ("test", "val")
        if self.eval_split not in splits:
            bad(f"--eval-split for {self.task} must be one of {splits}, got {self.eval_split!r}")
        return self

    def fingerprint(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field (task is the sub-command)."""
    for f in fields(EvalConfig):
        if f.name == "task":
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
