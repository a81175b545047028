"""FLOPs of a call, counted on fake tensors (no compute): torch's FlopCounterMode, with the CPU
flash-attention op (which it does not count) added with torch's own SDPA formulas."""
from __future__ import annotations

import torch


def _sdpa_cpu_mapping() -> dict:
    """FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash kernel: add it (same formulas)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def fwd(q, k, v, *a, out_shape=None, **kw):
        return sdpa_flop_count(q, k, v)

    def bwd(g, q, k, v, *a, out_shape=None, **kw):
        return sdpa_backward_flop_count(g, q, k, v)
    m = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        m[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        m[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return m


def count_flops(fn, params) -> dict:
    """FLOPs of `fn()` (forward + backward) counted on fake tensors: {'total', 'by_op'}; the fake
    gradients the backward leaves on `params` are dropped."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_mapping()) as fc:
            fn()
    for p in params:
        p.grad = None
    return {"total": fc.get_total_flops(), "by_op": {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}}


__all__ = ["count_flops"]
