"""Where and how a step runs: device, precision (with the CPU's bf16 support detected), process group."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def cpu_has_fast_bf16() -> tuple[bool, str]:
    """bf16 autocast only pays on CPUs with AMX or AVX512-BF16 (measured here: AMX bf16 matmul runs
    1.6-2.6 TFLOP/s on 2 cores vs ~0.3 for fp32); elsewhere it emulates and is slower than fp32."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = ""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        pass
    if "amx_bf16" in flags:
        return True, f"AMX-BF16 present (torch CPU capability {cap})"
    if "avx512_bf16" in flags:
        return True, f"AVX512-BF16 present (torch CPU capability {cap})"
    return False, f"no AMX/AVX512-BF16 (torch CPU capability {cap or 'unknown'})"


@dataclass
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    rank: int
    world_size: int
    local_rank: int
    why: str = ""  # why this precision (logged by the loop once logging is set up)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for 'auto' or an explicit request; explicit requests that cannot run raise."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "GPU supports bf16") if bf16 else ("fp16", "GPU lacks bf16: fp16 with a grad scaler")
        if requested == "bf16" and not bf16:
            raise ValueError("run.precision=bf16 but this GPU does not support bf16: use fp16 or auto")
        return requested, "requested"
    if requested == "fp16":
        raise ValueError("run.precision=fp16 is for GPUs (CPU autocast fp16 is slow and unscaled): use bf16 or fp32")
    fast, why = cpu_has_fast_bf16()
    if requested == "auto":
        return ("bf16", why) if fast else ("fp32", why + ": bf16 would be emulated, fp32 is faster")
    return requested, "requested"


def init_runtime(device: str, precision: str, backend: str = "auto") -> Runtime:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK), start the process group, pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible: use --run.device cpu")
        dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(be, device_id=dev if dev.type == "cuda" else None)
    prec, why = resolve_precision(precision, dev)
    return Runtime(dev, prec, rank, world, local_rank, why)
