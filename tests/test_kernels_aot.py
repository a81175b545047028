"""Every Triton kernel compiled ahead of time for the H100 (sm_90) without a GPU.

For each kernel, in the specialisations the launchers use at MCF's sizes (D = 768, Dd = 512,
C = 256): it must compile, spill nothing (cuobjdump's STACK and LOCAL are 0), fit the 227 KiB of
shared memory a block may use, and (gather / scatter) move rows with vectorised global loads.
Register and shared-memory figures are printed (`pytest -s`) for the issue note.
"""
import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
from mcf_fast.kernels import _gs_triton as G  # noqa: E402
from mcf_fast.kernels import _nce_triton as Q  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(fn, ptr_types, constexprs, num_warps, float_args=(), num_stages=3):
    """Build the signature the runtime would specialise to: 16-aligned pointers and strides/sizes."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("D", "C"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def _resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def _gs_cases():
    bd768, bd512 = G._blocks(49, 768), G._blocks(197, 512)
    base = dict(HAS_FILL=False, POS_MODE=0, STORE=True, ACC=False)
    yield ("gather_visible fwd bf16 x + fp32 pos -> fp32", G._gather_rows_fwd_kernel,
           {"out_ptr": "*fp32", "src_ptr": "*bf16", "idx_ptr": "*i64"},
           dict(base, POS_MODE=1, BLOCK_R=bd768[0], BLOCK_D=bd768[1]))
    yield ("gather_visible fwd bf16", G._gather_rows_fwd_kernel,
           {"out_ptr": "*bf16", "src_ptr": "*bf16", "idx_ptr": "*i64", "pos_ptr": "*bf16"},
           dict(base, POS_MODE=1, BLOCK_R=bd768[0], BLOCK_D=bd768[1]))
    bd196 = G._blocks(196, 768)
    yield ("gather_visible bwd bf16 (+ fp32 d pos)", G._gather_rows_fwd_kernel,
           {"out_ptr": "*bf16", "src_ptr": "*bf16", "idx_ptr": "*i32"},
           dict(base, HAS_FILL=True, ACC=True, BLOCK_R=bd196[0], BLOCK_D=bd196[1]))
    yield ("scatter_to_full fwd bf16 + fp32 pos", G._gather_rows_fwd_kernel,
           {"out_ptr": "*fp32", "src_ptr": "*bf16", "idx_ptr": "*i64"},
           dict(base, HAS_FILL=True, POS_MODE=2, BLOCK_R=bd512[0], BLOCK_D=bd512[1]))
    yield ("scatter_to_full bwd fp32 g -> bf16", G._scatter_rows_bwd_kernel,
           {"dst_ptr": "*bf16", "src_ptr": "*fp32", "idx_ptr": "*i64"},
           dict(STORE=True, ACC_POS=True, ACC_MASK=True, BLOCK_R=bd512[0], BLOCK_D=bd512[1]))


def _nce_cases():
    for dt, tl_dt in (("bf16", triton.language.bfloat16), ("fp16", triton.language.float16),
                      ("fp32", triton.language.float32)):
        for kind, fn in (("fwd", Q._info_nce_fwd_kernel), ("dq", Q._info_nce_bwd_dq_kernel),
                         ("dk", Q._info_nce_bwd_dk_kernel)):
            cfg = Q._cfg(256, dt == "fp32", kind)  # the launcher's own choice
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            yield f"{fn.__name__} C=256 {dt}", fn, {}, dict(DOT_DTYPE=tl_dt, IEEE=dt == "fp32", **cfg), warps, stages


REPORT = []


@pytest.mark.parametrize("case", list(_gs_cases()), ids=lambda c: c[0])
def test_gather_scatter_kernels_compile_for_h100(case):
    """sm_90 compile: no spills, shared memory within the limit, 16-byte (v4) vector global loads/stores."""
    name, fn, ptrs, const = case
    k = _compile(fn, ptrs, const, num_warps=4, num_stages=3)
    r = _resources(k.asm["cubin"])
    ptx = k.asm["ptx"]
    loads = sorted(set(re.findall(r"ld\.global[\w.]*", ptx)))
    stores = sorted(set(re.findall(r"st\.global[\w.]*", ptx)))
    print(f"\n[sm_90] {name}: REG {r['REG']} SHARED {r['SHARED']} STACK {r['STACK']} LOCAL {r['LOCAL']} "
          f"loads {loads} stores {stores}")
    assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{name} spills registers: {r}"
    assert k.metadata.shared <= SMEM_LIMIT and r["SHARED"] <= SMEM_LIMIT
    assert any(re.search(r"\.v[24]\.", s + ".") for s in loads), f"{name}: no vectorised loads in {loads}"
    assert any(re.search(r"\.v[24]\.", s + ".") for s in stores), f"{name}: no vectorised stores in {stores}"


@pytest.mark.parametrize("case", list(_nce_cases()), ids=lambda c: c[0])
def test_info_nce_kernels_compile_for_h100(case):
    """sm_90 compile of the tiled InfoNCE kernels: no spills, shared memory within the limit, tensor-core MMA for 16-bit."""
    name, fn, ptrs, const, warps, stages = case
    k = _compile(fn, ptrs, const, num_warps=warps, float_args=("inv_t",), num_stages=stages)
    r = _resources(k.asm["cubin"])
    print(f"\n[sm_90] {name} ({warps} warps): REG {r['REG']} SHARED {k.metadata.shared} "
          f"STACK {r['STACK']} LOCAL {r['LOCAL']}")
    assert r["STACK"] == 0 and r["LOCAL"] == 0, f"{name} spills registers: {r}"
    assert k.metadata.shared <= SMEM_LIMIT
    if "fp32" not in name:  # 16-bit dots must reach the tensor cores (wgmma on sm_90, mma otherwise)
        assert re.search(r"wgmma|mma\.sync", k.asm["ptx"]), f"{name}: no tensor-core instruction"
