"""Which implementation the kernels run: chosen once, by name, with reasons when a choice cannot run.

Names:
  auto       CUDA tensors -> Triton when it imports; any other tensor -> the CPU fast path.
  reference  the plain-PyTorch `*_ref` functions everywhere (debugging, tests, baselines).
  cpu        the fast torch formulation (flattened index_select, chunked log-sum-exp) on any device.
  triton     the Triton kernels; CPU tensors only under TRITON_INTERPRET=1 (set by tests, never here).

The choice comes from `set_backend(name)` or, when never set, from the environment variable
MCF_FAST_KERNELS (default auto). It is read once, on the first kernel call, so a step never
re-reads the environment.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

_LOG = logging.getLogger("mcf_fast.kernels")
# torch.library namespace of this copy's ops: "mcf_fast" when imported as mcf_fast.kernels, the package
# name otherwise (the light distribution's `mcf_fast_kernels`), so that both copies can load in one process
OPS_NS = "mcf_fast" if __package__ in ("mcf_fast.kernels", None, "") else __package__.replace(".", "_")
NAMES = ("auto", "reference", "cpu", "triton")
_ENV = "MCF_FAST_KERNELS"

_chosen: str | None = None
_logged: set = set()


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before triton loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_refusals(device: torch.device | None = None) -> list[str]:
    """Reasons the Triton backend cannot run for tensors on `device` (empty list: it can)."""
    why = []
    if not _triton_importable():
        why.append("the `triton` package is not installed (pip install triton)")
    if device is not None and device.type != "cuda" and not interpreter_on():
        why.append(f"tensors are on {device.type!r}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 "
                   "exported before triton is imported (slow; for tests)")
    if device is None and not torch.cuda.is_available() and not interpreter_on():
        why.append("torch sees no CUDA device and TRITON_INTERPRET is not 1")
    return why


def set_backend(name: str) -> None:
    """Choose the kernel backend for this process: one of auto | reference | cpu | triton.

    Raises ValueError for an unknown name and RuntimeError (listing the reasons) when `triton`
    is asked for and cannot run on this machine.
    """
    global _chosen
    name = str(name).strip().lower()
    if name not in NAMES:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(NAMES)} "
                         f"(via set_backend or {_ENV})")
    if name == "triton":
        why = triton_refusals(None)
        if why:
            raise RuntimeError("kernel backend 'triton' was requested but cannot run: "
                               + "; ".join(why) + f". Use {_ENV}=auto to fall back automatically.")
    _chosen = name
    if not torch.compiler.is_compiling():  # a logger call inside a traced region breaks the graph
        # 'auto' is the default and says nothing new; a forced backend is worth a line in the run's log
        _LOG.log(logging.DEBUG if name == "auto" else logging.INFO, "mcf_fast.kernels backend: %s", name)


def get_backend() -> str:
    """The backend name in force (reads MCF_FAST_KERNELS on first use when never set)."""
    if _chosen is None:
        set_backend(os.environ.get(_ENV, "auto") or "auto")
    return _chosen


def reset_backend() -> None:
    """Forget the choice so that the next call reads MCF_FAST_KERNELS again (for tests)."""
    global _chosen
    _chosen = None
    _logged.clear()


def resolve(device: torch.device) -> str:
    """The implementation to run for tensors on `device`: 'reference', 'cpu' or 'triton'.

    Pure Python on the device type: no host synchronisation, safe inside a step and under
    torch.compile (the result is a constant for a given device).
    """
    name = get_backend()
    if name == "reference" or name == "cpu":
        return name
    if name == "triton":
        why = triton_refusals(device)
        if why:
            raise RuntimeError("kernel backend 'triton' is forced but cannot run here: "
                               + "; ".join(why) + f". Set {_ENV}=auto (or cpu) instead.")
        return "triton"
    # auto
    if device.type == "cuda":
        if _triton_importable():
            return "triton"
        _once("auto: triton is not installed, CUDA tensors use the torch formulation (cpu path)")
        return "cpu"
    return "cpu"


def _once(msg: str) -> None:
    if msg not in _logged and not torch.compiler.is_compiling():
        _logged.add(msg)
        _LOG.warning("mcf_fast.kernels %s", msg)
