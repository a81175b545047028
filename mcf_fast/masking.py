"""Patch masks for MAE-style training: kinds in a registry, reproducible per sample, backend chosen once.

Kinds (`MASK_KINDS`, picked by `--model.mask_kind`; docs/METHOD.md §3):
  uniform  every K-subset of the L patches equally likely, per sample and view (MAE; the paper)
  block    BEiT-style rectangles, topped up uniformly to the same exact count
A kind is a `MaskKind` subclass (name, summary, the config fields it reads, a cheap `precheck(cfg)`,
`generate(batch_size, grid, mask_ratio, *, views, seed, step, sample_ids, device, backend) -> Masks`)
plus one `MASK_KINDS.register` line.

Every kind returns `Masks(ids_keep, ids_restore, mask)`:
- `ids_keep`    int64 [V, N, K], K = int(L * (1 - mask_ratio)) as MAE computes it; kept patch
  indices in ASCENDING order (the model relies on it: gathered tokens keep raster order);
- `ids_restore` int64 [V, N, L]: the inverse of `ids_shuffle = cat(ids_keep, ids_removed)` with
  `ids_removed` ascending too, i.e. exactly MAE's `argsort(ids_shuffle)`;
- `mask`        bool [V, N, L], True = removed (MAE's float mask is `mask.float()`).
Row (v, n) is a function of (seed, step, sample_ids[n], v) alone (Philox4x32-10 keyed by the seed,
counter from step / sample id / view; csrc/mask_algo.h, mcf_fast/mask_algo.py), so it does not depend
on the batch it is in, the rank, the thread count or the device. View v of a `views=V` call equals
view v of any call with more views; views, samples and steps draw from disjoint counters.

Backends: 'ext' is the compiled op `torch.ops.mcf_fast.random_masks` (mcf_fast._C: CPU with OpenMP,
CUDA); 'torch' is mcf_fast.mask_algo, the same algorithms in exact integer torch ops (same bits);
'auto' takes 'ext' where it can run and otherwise says once in the log that it falls back. Block masks
have no compiled op: they are torch integer ops on every device. A `MaskGenerator` chooses its backend
once, when it is built (`backend=` argument; None = the process default, `MCF_FAST_MASKS`, read on
first use and never again). `random_masks` and `block_masks` are the functional forms.
"""
from __future__ import annotations

import logging
import operator
import os
from fractions import Fraction

import torch

from . import mask_algo as _algo
from .mask_algo import Masks
from .registry import Registry

__all__ = ["BACKENDS", "MASK_KINDS", "MaskGenerator", "MaskKind", "Masks", "block_masks",
           "build_mask_generator", "choose_backend", "default_backend", "num_kept", "random_masks"]

_log = logging.getLogger(__name__)

_MAX_L = 2**31 - 1  # internal indices are uint32 ranges; ids fit int64 regardless
_MAX_VIEWS = 2**16  # view occupies 16 bits of the Philox counter
_MAX_STEP = 2**32 - 1  # step occupies one 32-bit counter word
_MAX_SAMPLE_ID = 2**48 - 1  # sample id occupies 48 bits of the counter
_MAX_SIDE = 2**12  # block masks: grid side (keeps every product in the int64 geometry exact)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), exactly MAE's `len_keep`."""
    return int(num_patches * (1 - mask_ratio))


# ----------------------------------------------------------------------------------- validation
def _as_int(name, value, lo, hi, hint, op="random_masks"):
    if torch.compiler.is_compiling() and not isinstance(value, (bool, float)):
        # Under torch.compile a changing int (the step) becomes symbolic; operator.index would
        # specialise it and recompile every step. A range check only adds a guard.
        if not lo <= value <= hi:
            raise ValueError(f"{op}: {name} must be in [{lo}, {hi}]; {hint}")
        return value
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} "
                        f"{value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {v}; {hint}")
    return v


def _check_device(device, op="random_masks"):
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{op}: device={device!r} is not a device; pass 'cpu', 'cuda' "
                         f"or 'cuda:N' ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: device {dev} is not supported; use 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{op}: device={device!r} but CUDA is not available; "
                               f"pass device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_sample_ids(sample_ids, batch_size, dev, op="random_masks"):
    if sample_ids is None:
        return torch.arange(batch_size, dtype=torch.int64, device=dev)
    if not isinstance(sample_ids, torch.Tensor):
        raise TypeError(f"{op}: sample_ids must be a 1-D int64 tensor, got "
                        f"{type(sample_ids).__name__}")
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: sample_ids must be int64 (or int32), got {sample_ids.dtype}")
    if tuple(sample_ids.shape) != (batch_size,):
        raise ValueError(f"{op}: sample_ids must have shape [batch_size] = [{batch_size}], "
                         f"got {tuple(sample_ids.shape)}")
    if sample_ids.device != dev:
        raise ValueError(f"{op}: sample_ids is on {sample_ids.device} but device={dev}; "
                         f"move it with sample_ids.to({str(dev)!r})")
    # A value check needs the data on the host: done for CPU tensors only (no sync on GPU, where
    # ids beyond 2^48 would alias, documented), and skipped while torch.compile traces.
    if dev.type == "cpu" and batch_size > 0 and not torch.compiler.is_compiling():
        lo, hi = int(sample_ids.min()), int(sample_ids.max())
        if lo < 0 or hi > _MAX_SAMPLE_ID:
            raise ValueError(f"{op}: sample_ids must be in [0, 2^48), got values in "
                             f"[{lo}, {hi}]; pass global sample indices")
    return sample_ids.to(torch.int64).contiguous()


def _validate(batch_size, num_patches, mask_ratio, views, seed, step, sample_ids, device,
              op="random_masks"):
    N = _as_int("batch_size", batch_size, 0, 2**31 - 1, "pass the number of samples", op)
    L = _as_int("num_patches", num_patches, 1, _MAX_L, "the index arithmetic is 32-bit", op)
    V = _as_int("views", views, 1, _MAX_VIEWS, "the view index has 16 bits in the RNG counter", op)
    seed = _as_int("seed", seed, 0, 2**64 - 1, "pass a non-negative seed below 2^64", op)
    step = _as_int("step", step, 0, _MAX_STEP, "the step has 32 bits in the RNG counter", op)
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:  # also rejects NaN
        raise ValueError(f"{op}: mask_ratio must be in [0, 1), got {mask_ratio}")
    K = num_kept(L, ratio)
    if not 1 <= K <= L:
        raise ValueError(f"{op}: mask_ratio={ratio} keeps K=int({L} * (1 - {ratio}))={K} "
                         f"of {L} patches; lower the ratio so that at least one patch is kept")
    dev = _check_device(device, op)
    ids = _check_sample_ids(sample_ids, N, dev, op)
    return N, L, V, seed, step, K, dev, ids


def _check_grid(grid, max_side=_MAX_L, op="random_masks"):
    """(H, W) from an int or a pair of ints."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"{op}: grid must be an int or (H, W), got {grid!r}")
    hint = "pass the patch grid as int or (H, W)"
    H, W = (_as_int(f"grid[{i}]", g, 1, max_side, hint, op) for i, g in enumerate(grid))
    _as_int("grid H * W", H * W, 1, _MAX_L, "the index arithmetic is 32-bit", op)
    return H, W


# -------------------------------------------------------------------------------------- backends
BACKENDS = ("auto", "ext", "torch")
ENV_BACKEND = "MCF_FAST_MASKS"
_FIX_BUILD = ("fix: from the repository, with torch installed, `pip install -v --no-build-isolation -e .` "
              "and read the lines starting '[mcf_fast setup]' (an _C built against another torch must be "
              "rebuilt the same way)")
_FIX_CUDA = ("fix: `MCF_FAST_BUILD_CUDA=1 pip install -v --no-build-isolation -e .` builds the CUDA part "
             "or says what is missing")
_EXT = None  # None = not tried yet, False = unavailable, else the mcf_fast._C module
_EXT_ERROR = ""
_DEFAULT = None  # the process default backend, from the environment on first use
_WARNED = set()


def _warn_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        _log.warning(msg)


def _extension():
    global _EXT, _EXT_ERROR
    if _EXT is None:
        try:
            from mcf_fast import _C
            _EXT = _C
        except ImportError as e:
            _EXT, _EXT_ERROR = False, str(e)
    return _EXT


def _check_choice(choice, source: str) -> str:
    c = choice.lower() if isinstance(choice, str) else choice
    if c not in BACKENDS:
        raise ValueError(f"{source}{choice!r}: the mask backend must be one of {', '.join(BACKENDS)}")
    return c


def default_backend() -> str:
    """The process default: `MCF_FAST_MASKS` (auto | ext | torch; unset = auto), read on first use only,
    so a generator's backend never changes under it."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = _check_choice(os.environ.get(ENV_BACKEND, "auto"), f"{ENV_BACKEND}=")
    return _DEFAULT


def _ext_missing(kind, dev) -> str | None:
    """Why `kind`'s compiled op cannot run on device `dev`, or None when it can."""
    if not kind.compiled:
        return (f"mask kind {kind.name!r} has no compiled op (its torch integer ops give the same masks on "
                f"every device)")
    if not _extension():
        return f"mcf_fast._C cannot be imported ({_EXT_ERROR}); {_FIX_BUILD}"
    if dev.type == "cuda" and getattr(_EXT, "WITH_CUDA", 0) != 1:
        return f"mcf_fast._C is built without CUDA; {_FIX_CUDA}"
    return None


def choose_backend(kind, device="cpu", backend=None) -> str:
    """'ext' or 'torch' for masks of `kind` (a MaskKind) on `device`. backend: 'auto', 'ext', 'torch' or
    None (the process default). 'ext' that cannot run is a RuntimeError saying why and how to fix it;
    'auto' falls back to 'torch' and says so once per kind and device type."""
    choice = default_backend() if backend is None else _check_choice(backend, "backend=")
    if choice == "torch":
        return "torch"
    dev = torch.device(device)
    why = _ext_missing(kind, dev)
    if why is None:
        return "ext"
    if choice == "ext":
        source, other = (("backend='ext'", "pass backend='auto' or 'torch'") if backend is not None else
                         (f"{ENV_BACKEND}=ext", f"unset {ENV_BACKEND} (or set it to auto or torch)"))
        raise RuntimeError(f"{source} cannot draw {kind.name} masks on {dev.type}: {why}; or {other}")
    if kind.compiled:
        _warn_once((kind.name, dev.type), f"{why}: {kind.name} masks on {dev.type} use the torch integer "
                   "ops (same masks, slower)")
    return "torch"


def _use_extension(dev) -> bool:
    """Whether uniform masks on `dev` run the compiled op by default (benchmark reports print it)."""
    return choose_backend(UniformMasks, dev) == "ext"


_random_masks_torch = _algo.uniform_masks  # the benchmarks time the fallback by this name


# ------------------------------------------------------------------------------ functional forms
def random_masks(batch_size, num_patches, mask_ratio, *, views=1, seed, step=0, sample_ids=None,
                 device="cpu", backend=None) -> Masks:
    """Uniform random masks for `views` views of `batch_size` samples; see the module docstring."""
    _, L, V, seed, step, K, dev, ids = _validate(batch_size, num_patches, mask_ratio, views, seed,
                                                 step, sample_ids, device)
    if choose_backend(UniformMasks, dev, backend) == "ext":
        # The op takes the seed as int64: seeds >= 2^63 travel as their two's complement.
        s64 = seed - 2**64 if seed >= 2**63 else seed
        return Masks(*torch.ops.mcf_fast.random_masks(ids, L, K, V, s64, step))
    return _algo.uniform_masks(ids, L, K, V, seed, step)


def block_masks(batch_size, grid, mask_ratio, *, views=1, seed, step=0, sample_ids=None,
                device="cpu", min_block=16, max_block=None, max_aspect=10 / 3,
                attempts=None) -> Masks:
    """BEiT-style block-wise masks with an exact budget, in the `random_masks` output format.

    Candidate rectangles of min_block..max_block patches (default max: the whole budget L - K; height
    uniform, aspect within 1/max_aspect..max_aspect) are taken in a row's candidate order while they add
    new patches and stay within the budget (BEiT's rule); `attempts` candidates per row (default
    10 per minimal block that fits the budget, plus 10). The shortfall is then removed uniformly among
    the patches still visible, so every row removes exactly L - K and batches stay rectangular.
    Candidates come from the rows' Philox streams (counters disjoint from uniform masks'), in
    integer arithmetic only (mcf_fast/mask_algo.py): the masks depend on (seed, step, sample id,
    view), never on the device.
    """
    op = "block_masks"
    H, W = _check_grid(grid, _MAX_SIDE, op)
    N, L, V, seed, step, K, dev, ids = _validate(batch_size, H * W, mask_ratio, views, seed, step,
                                                 sample_ids, device, op)
    target = L - K
    hi = target if max_block is None else _as_int("max_block", max_block, 1, L, "at most L", op)
    lo = min(_as_int("min_block", min_block, 1, _MAX_L, "at least 1 patch", op), max(hi, 1))
    if not float(max_aspect) >= 1.0:
        raise ValueError(f"{op}: max_aspect must be >= 1, got {max_aspect}")
    asp = Fraction(min(float(max_aspect), L)).limit_denominator(1000)  # h / w <= L: no limit above L
    T = 10 * (-(-target // lo)) + 10 if attempts is None else _as_int(
        "attempts", attempts, 0, 2**16, "candidates per row", op)
    return _algo.block_masks(ids, H, W, K, V, seed, step, lo, hi, asp.numerator, asp.denominator, T)


# ------------------------------------------------------------------------------------- the kinds
MASK_KINDS: Registry = Registry("mask kind", "--model.mask_kind")


def _config_grid(cfg) -> tuple[int, int]:
    m = getattr(cfg, "model", cfg)  # the whole Config or its model section
    g = m.img_size // m.patch_size
    return g, g


class MaskKind:
    """One way to draw masks. A new kind subclasses this, sets `name`, `summary` (and `fields` when it
    reads more), implements `generate`, and is registered with `MASK_KINDS.register`."""

    name = ""
    summary = ""
    fields = ("model.mask_ratio", "model.img_size", "model.patch_size", "run.seed")
    compiled = False  # True when mcf_fast._C has an op for this kind (the 'ext' backend)
    max_side = _MAX_L  # the largest patch-grid side `generate` takes

    @classmethod
    def precheck(cls, cfg) -> None:
        """Cheap checks before anything is built or written (cfg: the whole Config or its model section):
        ValueError with one line naming the option and the fix."""
        H, W = _config_grid(cfg)
        if max(H, W) > cls.max_side:
            raise ValueError(f"--model.mask_kind {cls.name!r}: a {H}x{W} patch grid is beyond its "
                             f"{cls.max_side} patches a side; raise --model.patch_size or use another kind")
        try:
            choice = default_backend()
        except ValueError as e:
            raise ValueError(f"{e} (unset it, or set it to auto)") from None
        why = _ext_missing(cls, torch.device("cpu")) if choice == "ext" else None
        if why:
            raise ValueError(f"{ENV_BACKEND}=ext: {why}; or unset {ENV_BACKEND}")

    @classmethod
    def generate(cls, batch_size, grid, mask_ratio, *, views, seed, step, sample_ids, device,
                 backend) -> Masks:
        """Masks for `views` views of `batch_size` samples on a grid (H, W); `backend` is 'ext' or 'torch'."""
        raise NotImplementedError(f"mask kind {cls.name!r} does not implement generate")


@MASK_KINDS.register
class UniformMasks(MaskKind):
    name = "uniform"
    summary = "every patch subset of the kept size equally likely, per sample and view (MAE, the paper)"
    compiled = True

    @classmethod
    def generate(cls, batch_size, grid, mask_ratio, *, views, seed, step, sample_ids, device,
                 backend) -> Masks:
        return random_masks(batch_size, grid[0] * grid[1], mask_ratio, views=views, seed=seed, step=step,
                            sample_ids=sample_ids, device=device, backend=backend)


@MASK_KINDS.register
class BlockMasks(MaskKind):
    name = "block"
    summary = "BEiT-style rectangles of >= 16 patches, topped up uniformly to the same count"
    max_side = _MAX_SIDE

    @classmethod
    def generate(cls, batch_size, grid, mask_ratio, *, views, seed, step, sample_ids, device,
                 backend) -> Masks:
        return block_masks(batch_size, grid, mask_ratio, views=views, seed=seed, step=step,
                           sample_ids=sample_ids, device=device)


# -------------------------------------------------------------------------------- the generator
class MaskGenerator:
    """Masks of one kind for one run: grid, ratio, seed, device and backend are fixed when it is built.

    `gen(batch_size, step=..., sample_ids=..., views=2) -> Masks`. `backend`: 'auto', 'ext', 'torch' or
    None (the process default, see `default_backend`); the choice is made here, once (`.backend`
    holds the result, 'ext' or 'torch'), so later changes to the environment change nothing.
    """

    def __init__(self, kind, grid, mask_ratio, *, seed, device="cpu", backend=None):
        self.kind = MASK_KINDS.get(kind) if isinstance(kind, str) else kind
        self.grid = _check_grid(grid, self.kind.max_side, "MaskGenerator")
        _, _, _, self.seed, _, _, self.device, _ = _validate(
            0, self.grid[0] * self.grid[1], mask_ratio, 1, seed, 0, None, device, "MaskGenerator")
        self.mask_ratio = float(mask_ratio)
        self.backend = choose_backend(self.kind, self.device, backend)

    def __call__(self, batch_size, *, step, sample_ids=None, views=2) -> Masks:
        return self.kind.generate(batch_size, self.grid, self.mask_ratio, views=views, seed=self.seed,
                                  step=step, sample_ids=sample_ids, device=self.device, backend=self.backend)

    def __repr__(self) -> str:
        return (f"MaskGenerator({self.kind.name}, grid={self.grid}, ratio={self.mask_ratio}, "
                f"device={self.device}, backend={self.backend})")


def build_mask_generator(m, *, seed, device="cpu", backend=None) -> MaskGenerator:
    """The generator a config asks for (m: the model section: mask_kind, mask_ratio, img_size / patch_size)."""
    return MaskGenerator(m.mask_kind, _config_grid(m), m.mask_ratio, seed=seed, device=device, backend=backend)
