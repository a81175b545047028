"""Typed configuration: one dataclass per section, a docstring per field, range checks, named presets.

Every field is settable from the command line as `--SECTION.FIELD VALUE` (`--model.depth 6`); tuples
take comma-separated values (`--model.teacher_layers 2,5,8,11`). Unknown keys and bad values are
errors before any work starts. A field whose values are kinds or named choices keeps no list of its
own: it names the registry declared beside the code that implements them (`metadata["choices"]`), and
validation, `--help` and docs/configuration.md ask that registry.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from mcf_fast.data.config import DataConfig
from mcf_fast.masking import MASK_KINDS
from mcf_fast.model.attention import ATTENTION, DEFAULT_ATTENTION
from mcf_fast.model.heads import HEAD_INITS
from mcf_fast.model.mcf import EMA_CADENCES, EMBED_MODES, PATCH_EMBED_BIASES
from mcf_fast.model.teacher import RESIZES, TEACHERS, parse_teacher_spec
from mcf_fast.registry import Registry

from .checks import check_numbers


def _f(default, help: str, choices: Registry | None = None, **kw):
    """A field with its help text; `choices` is the registry its values come from (help lists them)."""
    meta = {"help": help, **({"choices": choices} if choices is not None else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_choices(section) -> None:
    """Every field of `section` that names a registry holds one of its names (did-you-mean otherwise)."""
    for f in dataclasses.fields(section):
        reg = f.metadata.get("choices")
        if reg is not None and f.name != "teacher":  # the teacher spec is NAME[:ARG]: parse_teacher_spec
            reg.get(getattr(section, f.name))


@dataclass
class ModelConfig:
    img_size: int = _f(224, "Input side in pixels (square images).")
    patch_size: int = _f(16, "Patch side in pixels; img_size must be a multiple.")
    embed_dim: int = _f(768, "Encoder width D.")
    depth: int = _f(12, "Encoder blocks.")
    num_heads: int = _f(12, "Encoder attention heads (embed_dim must be divisible).")
    mlp_ratio: float = _f(4.0, "MLP hidden width / D in every block.")
    decoder_embed_dim: int = _f(512, "Decoder width Dd.")
    decoder_depth: int = _f(8, "Decoder blocks.")
    decoder_num_heads: int = _f(16, "Decoder attention heads.")
    decoder_init: str = _f("", "MAE pre-training checkpoint to initialise the decoder from ('' = fresh init).")
    decoder_init_blocks: int = _f(-1, "How many decoder blocks to load from decoder_init (-1 = all; "
                                      "norm and pixel head load only when all do; at most decoder_depth).")
    init: str = _f("", "Start from a reference-code MCF, MAE or mcf_fast checkpoint file: online/target encoder, "
                       "decoder, projector/predictor mapped (mapping printed), fresh optimizer ('' = fresh init).")
    mask_ratio: float = _f(0.75, "Fraction of patches removed in each view, in [0, 1).")
    mask_kind: str = _f("uniform", "How each view's removed patches are drawn.", MASK_KINDS)
    teacher: str = _f("random", "What judges the decoder's image (NAME, or checkpoint:PATH).", TEACHERS)
    teacher_layers: tuple = _f((2, 5, 8, 11), "Teacher blocks (0-based) whose token sequences are compared.")
    teacher_img_size: int = _f(224, "'random' teacher: input side (images are resized to it).")
    teacher_patch_size: int = _f(16, "'random' teacher: patch side.")
    teacher_embed_dim: int = _f(768, "'random' teacher: width.")
    teacher_depth: int = _f(12, "'random' teacher: blocks.")
    teacher_num_heads: int = _f(12, "Teacher heads ('checkpoint' teachers: heads are not in the weights).")
    norm_pix_loss: bool = _f(False, "'pixel' teacher: normalise each target patch (MAE's norm_pix_loss).")
    proj_hidden: int = _f(4096, "Projector / predictor hidden width (MoCo v3: 4096).")
    proj_dim: int = _f(256, "Projector / predictor output width (MoCo v3: 256).")
    temperature: float = _f(0.2, "Contrastive temperature T.")
    perceptual_weight: float = _f(1000.0, "Weight of the perceptual (or pixel) loss; the reference uses 1000.")
    contrastive_weight: float = _f(1.0, "Weight of the contrastive loss.")
    embed_mode: str = _f("gather_pixels", "How the encoder embeds the visible patches.", EMBED_MODES)
    grad_ckpt: bool = _f(False, "Recompute each block's activations in backward (less memory, ~30% more compute).")
    teacher_grad_ckpt: bool = _f(False, "Recompute the teacher's blocks in backward of the predicted-image pass "
                                        "(its activations dominate step memory; costs one more teacher forward).")
    compile: bool = _f(False, "torch.compile each block. Off: on the 2-core CPU (2026-11-26, demo preset, "
                              "fwd+bwd) eager took 2.0 s/step, compiled 4.7 s after a 90 s compile.")
    attention: str = _f(DEFAULT_ATTENTION, "Attention kernel of every ViT of the model (the default is "
                                           "$MCF_FAST_ATTENTION when set).", ATTENTION)
    head_init: str = _f("torch", "Projector/predictor Linear init.", HEAD_INITS)
    patch_embed_bias: str = _f("zeros", "Encoder patch-embedding bias init.", PATCH_EMBED_BIASES)
    teacher_resize: str = _f("bilinear", "Teacher input resize.", RESIZES)

    def validate(self):
        def bad(n, msg):
            raise ValueError(f"--model.{n} {getattr(self, n)!r}: {msg}")
        for n in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                  "decoder_depth", "decoder_num_heads", "proj_hidden", "proj_dim", "teacher_img_size",
                  "teacher_patch_size", "teacher_embed_dim", "teacher_depth", "teacher_num_heads"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1:
                bad(n, "must be a positive integer")
        if self.img_size % self.patch_size:
            bad("img_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            bad("num_heads", f"must divide embed_dim={self.embed_dim}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            bad("decoder_num_heads", f"must divide decoder_embed_dim={self.decoder_embed_dim}")
        for n in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, n) % 4:
                bad(n, "must be divisible by 4 (2-D sin-cos position embedding)")
        if not 0 <= self.mask_ratio < 1:
            bad("mask_ratio", "must be in [0, 1) (0.75 in the paper)")
        L = (self.img_size // self.patch_size) ** 2
        if int(L * (1 - self.mask_ratio)) < 1:
            bad("mask_ratio", f"keeps no patch of {L}; lower it")
        MASK_KINDS.get(self.mask_kind).precheck(self)  # unknown kinds: one line with the choices
        parse_teacher_spec(self.teacher)  # a registered kind, with a path exactly when it takes one
        check_choices(self)
        if not self.mlp_ratio > 0:
            bad("mlp_ratio", "must be > 0 (4 in ViT-B)")
        if not self.teacher_layers or any(int(i) < 0 for i in self.teacher_layers):
            bad("teacher_layers", "must be non-negative block indices, e.g. 2,5,8,11")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (0.2 in the paper)")
        if self.perceptual_weight < 0 or self.contrastive_weight < 0:
            bad("perceptual_weight" if self.perceptual_weight < 0 else "contrastive_weight", "must be >= 0")
        if self.perceptual_weight == 0 and self.contrastive_weight == 0:
            bad("contrastive_weight", "is 0 and so is --model.perceptual_weight: the loss is always 0 and nothing "
                "trains; give one of them a positive weight")
        if not -1 <= self.decoder_init_blocks <= self.decoder_depth:
            bad("decoder_init_blocks", f"must be -1 (all) or 0..{self.decoder_depth} (--model.decoder_depth)")
        if self.init and not os.path.isfile(self.init):
            bad("init", "is not a file: give a reference-code / MAE checkpoint (.pth) or a converted model file")


@dataclass
class OptimConfig:
    batch_size: int = _f(64, "Images per rank per micro-step.")
    accum_steps: int = _f(1, "Micro-steps accumulated per optimizer step.")
    epochs: float = _f(16.0, "Training length in epochs (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = use epochs).")
    blr: float = _f(1.5e-4, "Base LR; lr = blr * effective_batch / 256 (MAE's rule).")
    lr: float = _f(0.0, "Absolute LR; overrides blr when > 0.")
    min_lr: float = _f(0.0, "LR at the end of the cosine.")
    warmup_epochs: float = _f(1.0, "Linear warm-up length in epochs (warmup_steps wins when > 0).")
    warmup_steps: int = _f(0, "Linear warm-up length in optimizer steps.")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, tokens, position tables).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    decay_tokens: bool = _f(False, "Weight-decay cls_token and mask_token too (the reference code: timm 0.3.2 "
                                   "exempts only 1-D tensors and biases).")
    warmup_from_zero: bool = _f(False, "Warm-up lr = base * step / warmup, so the first step uses lr 0 (the "
                                       "reference code, MAE's schedule); false: base * (step + 1) / warmup.")
    clip_grad: float = _f(0.0, "Clip the global grad norm to this (0 = no clipping; the norm is logged anyway).")
    momentum: float = _f(0.99, "EMA momentum m of the target encoder.")
    momentum_schedule: str = _f("constant", "'constant' (the reference run) or 'cosine' (m -> 1, MoCo v3).")
    ema_update: str = _f("micro", "When the target EMA steps.", EMA_CADENCES)

    def validate(self):
        def bad(n, msg):
            raise ValueError(f"--optim.{n} {getattr(self, n)!r}: {msg}")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if self.accum_steps < 1:
            bad("accum_steps", "must be >= 1")
        if self.max_steps < 0:
            bad("max_steps", "must be >= 0 (0 = train for `epochs`)")
        if self.max_steps == 0 and self.epochs <= 0:
            bad("epochs", "must be > 0 when max_steps is 0")
        if self.lr < 0:
            bad("lr", "must be >= 0 (0 = derive it from --optim.blr)")
        if self.blr <= 0 and self.lr <= 0:
            bad("blr", "must be > 0 (or set --optim.lr)")
        if self.min_lr < 0:
            bad("min_lr", "must be >= 0")
        if self.warmup_epochs < 0 or self.warmup_steps < 0:
            bad("warmup_steps", "warm-up must be >= 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        for n in ("beta1", "beta2"):
            if not 0 <= getattr(self, n) < 1:
                bad(n, "must be in [0, 1)")
        if self.clip_grad < 0:
            bad("clip_grad", "must be >= 0")
        if not 0 <= self.momentum <= 1:
            bad("momentum", "must be in [0, 1]")
        if self.momentum_schedule not in ("constant", "cosine"):
            bad("momentum_schedule", "must be 'constant' or 'cosine'")
        check_choices(self)


@dataclass
class RunConfig:
    out: str = _f("runs/demo", "Run folder: config, metrics, events, checkpoints, images, export. "
                               "Rerunning with the same folder resumes.")
    seed: int = _f(0, "Seed of masks, data order, augmentation and initialisation.")
    device: str = _f("auto", "'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.")
    precision: str = _f("auto", "'auto' (bf16 on GPUs with bf16 and CPUs with AMX/AVX512-BF16, fp16+scaler "
                                "on older GPUs, else fp32), 'bf16', 'fp16' or 'fp32'.")
    threads: int = _f(0, "CPU threads for torch (0 = leave torch's default).")
    log_every: int = _f(10, "Optimizer steps between metrics lines (and finiteness checks).")
    ckpt_every: int = _f(100, "Optimizer steps between checkpoints (one is always written at the end).")
    keep_last: int = _f(2, "Complete checkpoints kept (the last finite one is never deleted).")
    vis_every: int = _f(0, "Steps between reconstruction grids (0 = only at the end).")
    max_nonfinite: int = _f(20, "Stop after this many consecutive non-finite steps (skipped, counted).")
    interrupt_ckpt_after_s: float = _f(120.0, "On Ctrl-C / SIGTERM the run stops after the current step and "
                                              "writes a checkpoint if the newest is older than this many seconds "
                                              "(0 = always); a second signal stops at once.")
    progress: str = _f("auto", "'auto' (bar on a terminal, plain lines otherwise), 'bar', 'lines' or 'none'.")
    tensorboard: bool = _f(True, "Write TensorBoard events under OUT/tb.")
    export: bool = _f(True, "Export the online encoder (encoder.safetensors + encoder.json) at the end.")
    allow_config_change: bool = _f(False, "Resume even if the saved config differs (otherwise an error).")
    memory_check: bool = _f(True, "On a GPU, refuse before anything is built a setting the cost sheet "
                                  "(python -m mcf_fast.plan) predicts will not fit, naming the switches that make "
                                  "it fit; false skips the check.")

    def validate(self):
        def bad(n, msg):
            raise ValueError(f"--run.{n} {getattr(self, n)!r}: {msg}")
        if not self.out:
            bad("out", "needs a folder path")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", "must be auto, cpu or cuda[:N]")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            bad("precision", "must be auto, bf16, fp16 or fp32")
        for n in ("log_every", "ckpt_every", "keep_last", "max_nonfinite"):
            if getattr(self, n) < 1:
                bad(n, "must be >= 1")
        if self.threads < 0 or self.vis_every < 0:
            bad("threads" if self.threads < 0 else "vis_every", "must be >= 0")
        if not self.interrupt_ckpt_after_s >= 0:
            bad("interrupt_ckpt_after_s", "must be >= 0 seconds (0 = always checkpoint on an interrupt)")
        if self.progress not in ("auto", "bar", "lines", "none"):
            bad("progress", "must be auto, bar, lines or none")
        if not isinstance(self.memory_check, bool):
            bad("memory_check", "must be true or false")


@dataclass
class DistConfig:
    backend: str = _f("auto", "Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo.")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward (less memory, "
                                           "one more all-gather in backward).")
    teacher_sharding: str = _f("replicate", "Frozen teacher: 'replicate' (no communication) or 'shard' "
                                            "(FSDP2, 1/world of its memory, all-gathers per pass).")
    negatives: str = _f("global", "'global': k gathered from all ranks (N*world negatives); 'local': "
                                  "per-rank negatives only (as the reference with accumulation saw).")

    def validate(self):
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"--dist.backend {self.backend!r}: must be auto, nccl or gloo")
        if self.teacher_sharding not in ("replicate", "shard"):
            raise ValueError(f"--dist.teacher_sharding {self.teacher_sharding!r}: must be replicate or shard")
        if self.negatives not in ("global", "local"):
            raise ValueError(f"--dist.negatives {self.negatives!r}: must be global or local")


@dataclass
class Config:
    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "Config":
        check_numbers(self)  # nan / inf first: they pass every `<` range check below
        for s in (self.model, self.optim, self.data, self.run, self.dist):
            s.validate()
        if self.data.img_size != self.model.img_size:
            raise ValueError(f"--data.img_size {self.data.img_size} differs from --model.img_size "
                             f"{self.model.img_size}: set both (or only --model.img_size; data follows it)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "optim", "data", "run", "dist")

# ----------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # Small enough to pre-train on 2 CPU cores in minutes on synthetic faces (README's demo, docs/training.md).
    "demo": {
        "model": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                      decoder_depth=2, decoder_num_heads=4, proj_hidden=512, proj_dim=128,
                      teacher="random", teacher_img_size=64, teacher_patch_size=8, teacher_embed_dim=128,
                      teacher_depth=4, teacher_num_heads=4, teacher_layers=(0, 1, 2, 3)),
        "optim": dict(batch_size=32, max_steps=150, blr=1.5e-3, warmup_steps=15, momentum=0.99),
        "data": dict(img_size=64, synthetic_size=2048, workers=0),
        "run": dict(out="runs/demo", log_every=10, ckpt_every=50, vis_every=50),
    },
    # ViT-S/16 encoder at 224 with the paper's teacher size (ViT-B/16; random unless a checkpoint is given).
    "vit-s": {
        "model": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256,
                      decoder_depth=4, decoder_num_heads=8),
        "optim": dict(batch_size=64, epochs=16, blr=1.5e-4, warmup_epochs=1),
        "data": dict(img_size=224),
        "run": dict(out="runs/vit-s"),
    },
    # The reference run (docs/METHOD.md §10): ViT-B/16, decoder 512-d x 8, batch 64 x accum 8 per GPU, 16 epochs.
    "vit-b-paper": {
        "model": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                      decoder_depth=8, decoder_num_heads=16, teacher="checkpoint:",
                      # the reference code's recipe outside the step (docs/METHOD.md §11; tests/test_recipe.py pins each)
                      head_init="xavier", patch_embed_bias="conv_default", teacher_resize="nearest"),
        "optim": dict(batch_size=64, accum_steps=8, epochs=16, blr=1.5e-4, warmup_epochs=1, weight_decay=0.05,
                      momentum=0.99, decay_tokens=True, warmup_from_zero=True),
        "data": dict(img_size=224, workers=8),
        "run": dict(out="runs/vit-b-paper", ckpt_every=1000, log_every=20),
    },
}


def from_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    cfg = Config(preset=name)
    for sec, vals in PRESETS[name].items():
        sub = getattr(cfg, sec)
        for k, v in vals.items():
            setattr(sub, k, v)
    return cfg

