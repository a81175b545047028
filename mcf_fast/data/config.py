"""`DataConfig`: every knob of the data path, embedded by the engine as its `data` section.

Each field carries its help text in `metadata["help"]` so the engine's CLI (`--data.path X`) can show
it; the kinds of source, and which fields each reads, come from the registry in `sources.py` when
the text is read. `validate()` raises ValueError naming the bad field and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

LOADERS = ("auto", "torch", "dali")
DECODERS = ("auto", "simplejpeg", "pillow", "torchvision", "cv2")
DTYPES = ("float32", "bfloat16", "float16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Help(dict):
    """A field's metadata whose "help" is completed from the data source registry when it is read, so
    --help names the kinds registered at that moment (`sources.SOURCES`), a kind added later included."""

    def __init__(self, name: str, text: str):
        super().__init__(help=text)
        self.name, self.text = name, text

    def _live(self) -> str:
        from . import sources  # lazy: importing the config must stay cheap
        if self.name == "path":
            kinds = "; ".join(f"{e.name}: {e.recognised}" for e in sources.SOURCES)
            return f"{self.text} {kinds}."
        if self.name == "loader":
            return f"{self.text} DALI reads: {sources.dali_readable()}."
        return self.text + sources.field_note(self.name)

    def __getitem__(self, key):
        return self._live() if key == "help" else super().__getitem__(key)

    def get(self, key, default=None):
        return self._live() if key == "help" else super().get(key, default)


def _f(default, name: str, text: str):
    return field(default=default, metadata=_Help(name, text))


@dataclass
class DataConfig:
    path: str = _f("", "path", (
        "Where the pre-training images are ('' = in-memory synthetic faces, the demo). Each kind of "
        "source is recognised in this order:"))
    loader: str = _f("auto", "loader", (
        "'torch' (DataLoader workers), 'dali' (NVIDIA DALI: GPU decode when CUDA is present, CPU "
        "otherwise; needs validated shards) or 'auto' (DALI when importable, the device is CUDA and "
        "the data is validated shards; else torch, which is the faster one on a CPU device, and "
        "nothing is said about DALI there)."))
    img_size: int = _f(224, "img_size", "Side S of the square training images [N,3,S,S].")
    workers: int = _f(2, "workers", (
        "Torch loader: DataLoader worker processes (0 = decode in the main process). "
        "DALI: CPU threads of the pipeline."))
    synthetic_size: int = _f(2048, "synthetic_size", (
        "Synthetic mode (path ''): number of distinct faces in one epoch."))
    synthetic_cache_mb: int = _f(256, "synthetic_cache_mb", (
        "Synthetic mode: keep drawn faces in memory up to this many MiB (0 = redraw every time)."))
    hflip: bool = _f(True, "hflip", (
        "Random horizontal flip (p=0.5), decided per (seed, epoch, sample) so resume is exact."))
    random_resized_crop: bool = _f(False, "random_resized_crop", (
        "RandomResizedCrop instead of plain resize (the paper leaves it off)."))
    rrc_scale: tuple[float, float] = _f((0.2, 1.0), "rrc_scale", (
        "Area fraction range of RandomResizedCrop."))
    rrc_ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "rrc_ratio", (
        "Aspect-ratio range of RandomResizedCrop."))
    mean: tuple[float, float, float] = _f(IMAGENET_MEAN, "mean", (
        "Per-channel mean (on 0..1 pixels) subtracted before dividing by std."))
    std: tuple[float, float, float] = _f(IMAGENET_STD, "std", (
        "Per-channel standard deviation used for normalisation."))
    decoder: str = _f("auto", "decoder", (
        "Torch loader JPEG decoder: auto (fastest installed: simplejpeg > cv2 > pillow), "
        "simplejpeg, pillow, torchvision or cv2. Non-JPEG images always go through pillow."))
    dtype: str = _f("float32", "dtype", (
        "dtype of the delivered images: float32, bfloat16 or float16."))
    prefetch: int = _f(2, "prefetch", (
        "Batches each worker (torch) or the pipeline (DALI) prepares ahead."))
    pin_memory: bool = _f(True, "pin_memory", (
        "Pin host batches before copying to a CUDA device (ignored on CPU)."))
    require_validated: bool = _f(False, "require_validated", (
        "Shards: require the index files written by `prepare` or `scan --write-index` (bad samples "
        "already left out). If False the torch loader indexes unvalidated tars itself (slower "
        "start-up, logged) and skips bad samples as it meets them; DALI always requires them."))
    shuffle_window: int = _f(1 << 20, "shuffle_window", (
        "Shuffle quality vs locality: shards (in a per-epoch random order) are grouped until a group "
        "holds this many samples, and samples are permuted within each group."))
    min_image_size: int = _f(8, "min_image_size", (
        "Images whose shorter side is below this many pixels are skipped (and counted)."))
    max_retries: int = _f(16, "max_retries", (
        "A bad sample is replaced by another sample of the epoch (deterministically); give up on "
        "a batch slot after this many bad replacements in a row."))
    max_file_mb: int = _f(64, "max_file_mb", (
        "Image files, tar members and LMDB values above this many MiB are skipped unread (too_large): "
        "a hostile header claiming 60 GiB must not be allocated."))
    max_pixels: int = _f(89_478_485, "max_pixels", (
        "Images whose header claims more pixels (width x height) are skipped undecoded (too_large): "
        "decompression bombs. Default: Pillow's MAX_IMAGE_PIXELS (about 9459 x 9459)."))

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
