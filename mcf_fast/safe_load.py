"""Weights-only loading of training checkpoints that carry plain containers beside their tensors.

MAE's and the MCF reference code's `save_model` store `{'model', 'optimizer', 'epoch', 'scaler', 'args'}`
with `args` an `argparse.Namespace` (sometimes holding numpy scalars). `torch.load(weights_only=True)`
refuses those classes, so a user would be tempted to pass `weights_only=False` and run arbitrary code.
Here exactly these inert classes are allowed, for the duration of one load, and nothing else: a file
that needs any other global (a function, a model class) is refused with the globals it asked for.
`arrays=True` also allows numpy arrays (`ndarray` rebuilt by `_reconstruct`, whose subtype can only be
an allowed class): LAION-Face's released face detections are dicts of them (`mcf_fast.data.boxes`).
Top level, not under model/ or data/, because both read user files through it.
"""
from __future__ import annotations

import argparse
import contextlib

import torch


def _numpy_globals(arrays: bool) -> list:
    """numpy scalars and dtypes (and arrays), under the names both numpy 1.x and 2.x pickles use."""
    try:
        import numpy as np
    except ImportError:  # no numpy: no numpy pickles can be read either way
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out: list = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                 (scalar, "numpy._core.multiarray.scalar")]
    if arrays:
        rebuild = core.multiarray._reconstruct
        out += [np.ndarray, (rebuild, "numpy.core.multiarray._reconstruct"),
                (rebuild, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc.
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def allowed_globals(arrays: bool = False) -> list:
    """The allow-list: argparse.Namespace plus numpy scalar / dtype reconstruction; nothing callable beyond."""
    return [argparse.Namespace, *_numpy_globals(arrays)]


def _context(arrays: bool):
    allowed = allowed_globals(arrays)
    sg = getattr(torch.serialization, "safe_globals", None)
    if sg is None:  # torch < 2.5 has only the process-wide list; tuples (aliases) are 2.6+
        torch.serialization.add_safe_globals([g for g in allowed if not isinstance(g, tuple)])
        return contextlib.nullcontext()
    try:
        return sg(allowed)
    except TypeError:  # torch 2.5: no (obj, name) aliases
        return sg([g for g in allowed if not isinstance(g, tuple)])


def _refused_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # older torch or an unreadable file: the caller's message still stands
        return []


def safe_torch_load(path: str, arrays: bool = False):
    """`torch.load(path, weights_only=True)` with the allow-list above; a clear ValueError otherwise."""
    try:
        with _context(arrays):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say which globals, not a pickle trace
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                   for g in allowed_globals(arrays)}
        extra = [g for g in _refused_globals(path) if g not in allowed]
        what = f" (it needs {extra[:6]}, which are not plain data)" if extra else f": {str(e).splitlines()[0][:300]}"
        raise ValueError(f"could not read {path!r} as a weights-only torch checkpoint{what}. Files that need "
                         "arbitrary code to unpickle are refused; re-save it as a plain state dict "
                         "(torch.save(ckpt['model'], 'weights.pth')) from code you trust.") from e


__all__ = ["safe_torch_load", "allowed_globals"]
