"""GPU measurements the device check makes in a child process, each printed as one JSON line.

    python -m benchmarks.device_kit.probes peak        bf16 (and fp32) square-matmul peak: the MFU denominator
    python -m benchmarks.device_kit.probes bandwidth   gather_visible / scatter_to_full bytes moved per second
                                                       against a device-to-device copy measured in the same process

Bytes are counted as the kernels must move them at least once: every element read and every element
written (the index tensors included), nothing for cache re-reads.
"""
import json
import sys

import torch

from .. import harness as H
from ..machine import matmul_peak


def _ms(fn, reps=20):
    """Median milliseconds of fn over reps CUDA-event-timed calls, after 3 warm-ups."""
    return sorted(H.measure({"op": fn}, warmup=3, reps=reps, device=torch.device("cuda"))["op"])[reps // 2]


def peak() -> dict:
    return {name: matmul_peak(dt, "cuda", budget_s=6.0) for name, dt in (("bf16", torch.bfloat16),
                                                                         ("fp32", torch.float32))}


def _copy_rate() -> dict:
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far beyond the L2
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src))
    return {"bytes": 2 * src.numel(), "ms": ms, "gb_per_s": 2 * src.numel() / (ms / 1e3) / 1e9}


def _gs_rows(copy_gbs: float) -> list[dict]:
    import mcf_fast.kernels as K
    K.set_backend("triton")
    rows = []
    N, L, K_keep = 1024, 196, 49
    for D, dt in ((768, torch.bfloat16), (768, torch.float32)):
        x = torch.randn(N, L, D, device="cuda", dtype=dt)
        pos = torch.randn(1 + L, D, device="cuda", dtype=dt)
        cls = torch.randn(1, 1, D, device="cuda", dtype=dt)
        ids = torch.rand(N, L, device="cuda").argsort(1)[:, :K_keep].contiguous()
        es = x.element_size()
        # read: the kept rows of x, pos, cls, the ids; written: the output
        moved = (N * K_keep * D + pos.numel() + D + N * (1 + K_keep) * D) * es + ids.numel() * ids.element_size()
        ms = _ms(lambda: K.gather_visible(x, ids, pos, cls))
        rows.append({"op": "gather_visible fwd", "shape": f"N={N} L={L} K={K_keep} D={D}", "dtype": str(dt)[6:],
                     "bytes": moved, "ms": ms})
    Dd = 512
    for dt in (torch.bfloat16, torch.float32):
        t = torch.randn(N, 1 + K_keep, Dd, device="cuda", dtype=dt)
        m = torch.randn(1, 1, Dd, device="cuda", dtype=dt)
        pos = torch.randn(1 + L, Dd, device="cuda", dtype=dt)
        restore = torch.rand(N, L, device="cuda").argsort(1).argsort(1).contiguous()
        es = t.element_size()
        # read: tokens, pos, mask token, ids_restore; written: the full sequence
        moved = (t.numel() + pos.numel() + Dd + N * (1 + L) * Dd) * es + restore.numel() * restore.element_size()
        ms = _ms(lambda: K.scatter_to_full(t, restore, m, pos))
        rows.append({"op": "scatter_to_full fwd", "shape": f"N={N} L={L} K={K_keep} Dd={Dd}", "dtype": str(dt)[6:],
                     "bytes": moved, "ms": ms})
    for r in rows:
        r["gb_per_s"] = r["bytes"] / (r["ms"] / 1e3) / 1e9
        r["fraction_of_copy"] = r["gb_per_s"] / copy_gbs
    K.reset_backend()
    return rows


def bandwidth() -> dict:
    copy = _copy_rate()
    return {"copy": copy, "kernels": _gs_rows(copy["gb_per_s"])}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    probes = {"peak": peak, "bandwidth": bandwidth}
    if len(argv) != 1 or argv[0] not in probes:
        print(f"usage: python -m benchmarks.device_kit.probes {'|'.join(probes)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: probes need a CUDA device", file=sys.stderr)
        return 2
    print("PROBE_JSON " + json.dumps(probes[argv[0]]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
