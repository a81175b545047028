"""mcf_fast.kernels: fused masked-token gather/scatter and tiled InfoNCE, with MAE drop-ins.

Every op has a plain-PyTorch `*_ref` with the same signature (the spec), a torch fast path for CPU
tensors and Triton kernels for CUDA tensors; `set_backend` / MCF_FAST_KERNELS choose between them.
Importing this package touches neither CUDA nor triton nor any global torch setting.
"""
from .backend import get_backend, reset_backend, set_backend
from .gather_scatter import gather_visible, gather_visible_ref, scatter_to_full, scatter_to_full_ref
from .info_nce import info_nce, info_nce_ref
from .mae_dropin import is_patched, patch_mae, random_masking, unpatch_mae, unshuffle_decoder_tokens

__all__ = [
    "gather_visible", "scatter_to_full", "info_nce", "random_masking", "unshuffle_decoder_tokens",
    "patch_mae", "unpatch_mae", "is_patched", "gather_visible_ref", "scatter_to_full_ref", "info_nce_ref",
    "set_backend", "get_backend", "reset_backend",
]
