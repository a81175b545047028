"""The model's one seam to the data-movement and loss kernels.

The model calls `gather_visible`, `scatter_to_full` and `info_nce` only through this module. They
come from `mcf_fast.kernels` (installed with the package): Triton on CUDA, fast CPU paths, and the
plain-PyTorch references with `MCF_FAST_KERNELS=reference`.
"""
from mcf_fast.kernels import gather_visible, info_nce, scatter_to_full

__all__ = ["gather_visible", "scatter_to_full", "info_nce"]
