"""`DataConfig`: every knob of the data path, embedded by the engine as its `data` section.

Each field carries its help text in `metadata["help"]` so the engine's CLI (`--data.path X`) can show
it; `validate()` raises ValueError naming the bad field and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

LOADERS = ("auto", "torch", "dali")
DECODERS = ("auto", "simplejpeg", "pillow", "torchvision", "cv2")
DTYPES = ("float32", "bfloat16", "float16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    path: str = field(default="", metadata={"help": (
        "Where the pre-training images are: '' = in-memory synthetic faces (the demo); a folder of "
        "images (any depth); a webdataset shard pattern like 'faces-{000000..000099}.tar' (or one "
        ".tar, or a folder holding *.tar); a list file (*.txt, one image path or shard per line); "
        "or an LMDB database (folder with data.mdb, or *.lmdb).")})
    loader: str = field(default="auto", metadata={"help": (
        "'torch' (DataLoader workers), 'dali' (NVIDIA DALI: GPU decode when CUDA is present, CPU "
        "otherwise; needs validated shards) or 'auto' (DALI when importable, the device is CUDA and "
        "the data is validated shards; else torch, which is the faster one on a CPU device).")})
    img_size: int = field(default=224, metadata={"help": "Side S of the square training images [N,3,S,S]."})
    workers: int = field(default=2, metadata={"help": (
        "Torch loader: DataLoader worker processes (0 = decode in the main process). "
        "DALI: CPU threads of the pipeline.")})
    synthetic_size: int = field(default=2048, metadata={"help": (
        "Synthetic mode (path ''): number of distinct faces in one epoch.")})
    synthetic_cache_mb: int = field(default=256, metadata={"help": (
        "Synthetic mode: keep drawn faces in memory up to this many MiB (0 = redraw every time).")})
    hflip: bool = field(default=True, metadata={"help": (
        "Random horizontal flip (p=0.5), decided per (seed, epoch, sample) so resume is exact.")})
    random_resized_crop: bool = field(default=False, metadata={"help": (
        "RandomResizedCrop instead of plain resize (the paper leaves it off).")})
    rrc_scale: tuple[float, float] = field(default=(0.2, 1.0), metadata={"help": (
        "Area fraction range of RandomResizedCrop.")})
    rrc_ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata={"help": (
        "Aspect-ratio range of RandomResizedCrop.")})
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata={"help": (
        "Per-channel mean (on 0..1 pixels) subtracted before dividing by std.")})
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata={"help": (
        "Per-channel standard deviation used for normalisation.")})
    decoder: str = field(default="auto", metadata={"help": (
        "Torch loader JPEG decoder: auto (fastest installed: simplejpeg > cv2 > pillow), "
        "simplejpeg, pillow, torchvision or cv2. Non-JPEG images always go through pillow.")})
    dtype: str = field(default="float32", metadata={"help": (
        "dtype of the delivered images: float32, bfloat16 or float16.")})
    prefetch: int = field(default=2, metadata={"help": (
        "Batches each worker (torch) or the pipeline (DALI) prepares ahead.")})
    pin_memory: bool = field(default=True, metadata={"help": (
        "Pin host batches before copying to a CUDA device (ignored on CPU).")})
    require_validated: bool = field(default=False, metadata={"help": (
        "Shards: require the index files written by `prepare` or `scan --write-index` (bad samples "
        "already left out). If False the torch loader indexes unvalidated tars itself (slower "
        "start-up, logged) and skips bad samples as it meets them; DALI always requires them.")})
    shuffle_window: int = field(default=1 << 20, metadata={"help": (
        "Shuffle quality vs locality: shards (in a per-epoch random order) are grouped until a group "
        "holds this many samples, and samples are permuted within each group.")})
    min_image_size: int = field(default=8, metadata={"help": (
        "Images whose shorter side is below this many pixels are skipped (and counted).")})
    max_retries: int = field(default=16, metadata={"help": (
        "A bad sample is replaced by another sample of the epoch (deterministically); give up on "
        "a batch slot after this many bad replacements in a row.")})
    max_file_mb: int = field(default=64, metadata={"help": (
        "Image files, tar members and LMDB values above this many MiB are skipped unread (too_large): "
        "a hostile header claiming 60 GiB must not be allocated.")})
    max_pixels: int = field(default=89_478_485, metadata={"help": (
        "Images whose header claims more pixels (width x height) are skipped undecoded (too_large): "
        "decompression bombs. Default: Pillow's MAX_IMAGE_PIXELS (about 9459 x 9459).")})

    def validate(self) -> DataConfig:
        """Check every field; raise ValueError naming the field, the bad value and the fix."""
        def bad(name, msg):
            raise ValueError(f"--data.{name} {getattr(self, name)!r}: {msg}")

        if not isinstance(self.path, str):
            bad("path", "must be a string ('' for synthetic faces, a folder, a shard pattern or a list file)")
        if self.loader not in LOADERS:
            bad("loader", f"must be one of {LOADERS}")
        if self.decoder not in DECODERS:
            bad("decoder", f"must be one of {DECODERS}")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if not isinstance(self.img_size, int) or not 8 <= self.img_size <= 4096:
            bad("img_size", "must be an int in [8, 4096] (224 in the paper)")
        if not isinstance(self.workers, int) or self.workers < 0:
            bad("workers", "must be an int >= 0 (0 = load in the main process)")
        if not isinstance(self.synthetic_size, int) or self.synthetic_size < 1:
            bad("synthetic_size", "must be an int >= 1 (faces per synthetic epoch)")
        if self.synthetic_cache_mb < 0:
            bad("synthetic_cache_mb", "must be >= 0 (0 disables the cache)")
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            bad("rrc_scale", "must be (lo, hi) with 0 < lo <= hi <= 1, e.g. (0.2, 1.0)")
        if len(self.rrc_ratio) != 2 or not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            bad("rrc_ratio", "must be (lo, hi) with 0 < lo <= hi, e.g. (0.75, 1.333)")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                bad(name, "must have 3 values (R, G, B)")
        if any(s <= 0 for s in self.std):
            bad("std", "every value must be > 0")
        if self.prefetch < 1:
            bad("prefetch", "must be >= 1")
        if self.shuffle_window < 1:
            bad("shuffle_window", "must be >= 1 sample")
        if self.min_image_size < 1:
            bad("min_image_size", "must be >= 1 pixel")
        if self.max_retries < 1:
            bad("max_retries", "must be >= 1")
        if not isinstance(self.max_file_mb, int) or not 1 <= self.max_file_mb <= 65536:
            bad("max_file_mb", "must be an int in [1, 65536] MiB (64 is plenty for one face image)")
        if not isinstance(self.max_pixels, int) or not 64 <= self.max_pixels <= 1 << 34:
            bad("max_pixels", "must be an int in [64, 2**34] (default 89478485, Pillow's limit)")
        return self


def help_texts() -> dict[str, str]:
    """{field name: help text} for the engine's CLI."""
    return {f.name: f.metadata.get("help", "") for f in fields(DataConfig)}
