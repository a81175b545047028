"""The machines the sheet plans for, and the published numbers its speed range rests on.

Every number here is an assumption with a source; the first GPU run of `benchmarks/device_check.py`
is what calibrates them. Peaks are dense (no sparsity) tensor-core rates; fp32 training uses the
plain fp32 rate because PyTorch leaves TF32 matmuls off by default.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20

# MFU anchors (model FLOPs per second / the datasheet's dense peak), each with where it comes from.
NEMO_VIT_H100 = (0.29, "NVIDIA NeMo ViT-g/14 training on H100: about 29% MFU")
VIT_A100 = (0.45, "published ViT training on A100: about 45% MFU")
HOPPER_MEASURED = (790e12, "bf16 dense matmul measured on an H200: about 790 TFLOP/s (80% of the 989 datasheet)")
DAILYMAE_IMG_S = 1980.0  # MAE-B/16 on ImageNet-1K, 800 epochs in 18 h on 8 A100 (DailyMAE, arXiv 2404.00509)
DAILYMAE_SOURCE = ("DailyMAE: MAE-B/16, 800 ImageNet-1K epochs in 18 h on 8 A100 = about 1,980 img/s per GPU "
                   "(with progressive resizing, so its MFU at 224 px is an upper estimate)")


def vit_train_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward + backward FLOPs of `depth` ViT blocks on `tokens` tokens (matmuls and attention only,
    counted as FlopCounterMode counts them: 2 per multiply-add, backward twice the forward for the
    linears and 2.5 times for attention)."""
    linear = tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv, proj, fc1, fc2 multiply-adds
    attn = 2 * tokens * tokens * dim  # scores and the weighted sum
    return depth * 2 * (3 * linear + 3.5 * attn)


def mae_b_flops_per_image() -> float:
    """MAE-B/16 at 224 (ViT-B encoder on 49 + 1 tokens, 8 x 512-d decoder on 197): its training FLOPs."""
    # + the patch embedding of the 49 visible patches (no input gradient: pixels need none)
    enc = vit_train_flops(50, 768, 12) + 2 * 2 * 49 * 768 * 768
    dec = vit_train_flops(197, 512, 8) + 3 * 2 * (50 * 768 * 512 + 197 * 512 * 768)  # + embed and pixel head
    return enc + dec


def dailymae_mfu() -> float:
    """DailyMAE's throughput as a share of the A100's dense bf16 peak."""
    return DAILYMAE_IMG_S * mae_b_flops_per_image() / A100.peak["bf16"]


@dataclass(frozen=True)
class Machine:
    """One accelerator kind: memory as the driver reports it, dense peaks, links, and the MFU range."""
    name: str
    memory: int  # bytes the device reports
    peak: dict  # precision -> FLOP/s
    peak_source: str
    link: float  # bytes/s one GPU sends to its node's peers (one direction)
    link_source: str
    network: float  # bytes/s one GPU sends off its node (one direction)
    network_source: str

    def mfu_range(self) -> dict:
        """{'low', 'likely', 'high'}: shares of the dense peak, with how each was derived."""
        return _mfu_range(self)


_H100_PEAK = {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}
H100 = Machine("H100 SXM 80GB", 81559 * MiB, _H100_PEAK,
               "H100 SXM datasheet: 989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32",
               450e9, "NVLink 4: 900 GB/s per GPU, both directions together",
               50e9, "one 400 Gb/s InfiniBand NDR port per GPU (DGX H100)")
H200 = Machine("H200 SXM 141GB", 143771 * MiB, _H100_PEAK,
               "H200 SXM: the H100's compute (989 TFLOP/s dense bf16), 141 GB HBM3e",
               450e9, "NVLink 4: 900 GB/s per GPU, both directions together",
               50e9, "one 400 Gb/s InfiniBand NDR port per GPU (DGX H200)")
A100 = Machine("A100 SXM 80GB", 81920 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
               "A100 datasheet: 312 TFLOP/s dense bf16/fp16, 19.5 TFLOP/s fp32",
               300e9, "NVLink 3: 600 GB/s per GPU, both directions together",
               25e9, "one 200 Gb/s InfiniBand HDR port per GPU (DGX A100)")
GPUS = {"h100": H100, "h200": H200, "a100": A100}


def _mfu_range(m: Machine) -> dict:
    daily = dailymae_mfu()
    vit_a100, src_a100 = VIT_A100
    if m is A100:
        return {"low": (daily, f"DailyMAE's MAE-B rate on A100 ({DAILYMAE_SOURCE})"),
                "likely": ((daily + vit_a100) / 2, "midway between the two A100 anchors"),
                "high": (vit_a100, src_a100)}
    nemo, src_nemo = NEMO_VIT_H100
    peak_share = HOPPER_MEASURED[0] / H100.peak["bf16"]
    return {"low": (nemo * daily / vit_a100, f"NeMo's 29% x DailyMAE {daily:.0%} / ViT {vit_a100:.0%} on A100 (a "
                                             "ViT-B-sized step runs further below the peak than a ViT-g one)"),
            "likely": (nemo, src_nemo),
            "high": (vit_a100 * peak_share, f"A100's best ViT share ({vit_a100:.0%}) of Hopper's measured matmul "
                                            f"peak ({HOPPER_MEASURED[1]})")}


def cpu_machine(memory: int, peak: dict, source: str) -> Machine:
    """This machine as the target (`--gpu cpu`): its RAM, its measured matmul peak, no links."""
    return Machine("this CPU", memory, peak, source, 0.0, "one process: no collectives", 0.0, "")


CPU_MFU = {"low": (0.5, "the step suite's vit-b-paper fp32 engine step on 2 CPU cores: 68% of the measured "
                        "matmul peak, less a margin for other load"),
           "likely": (0.68, "the step suite's vit-b-paper fp32 engine step: 67.6% MFU (2 cores)"),
           "high": (0.83, "the step suite's vit-s fp32 engine step: 83% MFU (2 cores)")}

__all__ = ["Machine", "GPUS", "H100", "H200", "A100", "GiB", "MiB", "cpu_machine", "CPU_MFU", "dailymae_mfu",
           "mae_b_flops_per_image", "vit_train_flops"]
