"""FLOPs of a call, counted on fake tensors (no compute): torch's FlopCounterMode, with the CPU
flash-attention op (which it does not count) added by the package's own mapping
(`mcf_fast.plan.trace.sdpa_cpu_flops`, the one statement of those formulas, which the cost sheet uses too)."""
from __future__ import annotations


def count_flops(fn, params) -> dict:
    """FLOPs of `fn()` (forward + backward) counted on fake tensors: {'total', 'by_op'}; the fake
    gradients the backward leaves on `params` are dropped."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from mcf_fast.plan.trace import sdpa_cpu_flops
    with FakeTensorMode(allow_non_fake_inputs=True):
        with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()) as fc:
            fn()
    for p in params:
        p.grad = None
    return {"total": fc.get_total_flops(), "by_op": {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}}


__all__ = ["count_flops"]
