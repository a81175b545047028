"""Attention backends: the kernel a ViT's attention layers call, chosen by name when the ViT is built.

Each backend is a registry entry (`mcf_fast.registry`) owning its name, a one-line summary, the config
field that picks it, a cheap `precheck(cfg)` (before anything is built) and `build() -> attend`, where
`attend(q, k, v)` takes and returns `[B, H, T, Dh]` tensors. The choice is a constructor argument of
`Attention` / `Block` / `VisionTransformer`: building one model never changes another's attention.

`MCF_FAST_ATTENTION` (if set) is read once, when this module is imported, as the default for models
built without an explicit backend; setting it later changes nothing.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F

from mcf_fast.registry import Registry

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ATTENTION: Registry = Registry("attention backend", "--model.attention")

ENV = "MCF_FAST_ATTENTION"
DEFAULT_ATTENTION = os.environ.get(ENV, "sdpa")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBackend:
    """Base of the entries: the field that picks them, and nothing to check unless a backend says so."""
    fields = ("model.attention",)

    @staticmethod
    def precheck(cfg) -> None:
        pass


@ATTENTION.register
class Sdpa(AttentionBackend):
    name = "sdpa"
    summary = "torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, fused on CPU"
    build = staticmethod(lambda: _sdpa)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda:  # xformers has no CPU kernels: a CPU copy of the model (export, eval) uses SDPA
        return _sdpa(q, k, v)
    import xformers.ops as xops
    # xformers wants [B, T, H, Dh]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@ATTENTION.register
class Xformers(AttentionBackend):
    name = "xformers"
    summary = "xformers' memory_efficient_attention on CUDA tensors, SDPA on other devices; opt-in"

    @staticmethod
    def precheck(cfg) -> None:
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--model.attention 'xformers': xformers is not installed; install the [xformers] "
                             "extra or use --model.attention sdpa")

    @staticmethod
    def build() -> Attend:
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--model.attention 'xformers': xformers is not importable ({e}); install the "
                             "[xformers] extra or use --model.attention sdpa") from None
        return _xformers


def resolve(name: str | None) -> tuple[str, Attend]:
    """(backend name, attend function) for `name`, or for the default when `name` is None."""
    if name is None:
        if DEFAULT_ATTENTION not in ATTENTION:
            raise ValueError(f"{ENV}={DEFAULT_ATTENTION!r}: unknown attention backend; choose one of "
                             f"{ATTENTION.choices()} (or unset it)")
        name = DEFAULT_ATTENTION
    return name, ATTENTION.get(name).build()


__all__ = ["ATTENTION", "AttentionBackend", "DEFAULT_ATTENTION", "resolve"]
