"""Build checks for csrc/: the CUDA source compiles for sm_90 (ptxas report kept, no spills), and
an AddressSanitizer build of the CPU op runs clean. Both compile with torch's headers (about a
minute each on 2 cores), hence `slow`; CI runs them."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _torch_includes():
    from torch.utils import cpp_extension
    try:
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6 spells it cuda=True
        return cpp_extension.include_paths(cuda=True)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: no CUDA headers")
def test_cuda_source_compiles_for_sm90(tmp_path):
    """csrc/masks_cuda.cu compiles for sm_90 with -Xptxas -v: no spills, no local stack."""
    cmd = [_nvcc(), "-c", os.path.join(CSRC, "masks_cuda.cu"), "-o", str(tmp_path / "m.o"),
           "-gencode", "arch=compute_90,code=sm_90", "-O3", "-std=c++20", "-Xptxas", "-v",
           "-DMCF_FAST_WITH_CUDA", "--expt-relaxed-constexpr", "--compiler-options", "-fPIC",
           "-I", CSRC, "-I", sysconfig.get_paths()["include"]]
    for inc in _torch_includes():
        cmd += ["-I", inc]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    report = out.stdout + out.stderr
    print(report)  # the ptxas resource report, visible with -s / in CI logs
    dest = os.environ.get("MCF_FAST_PTXAS_REPORT")
    if dest:
        with open(dest, "w") as f:
            f.write(report)
    assert out.returncode == 0, report[-4000:]
    assert "random_masks_kernel" in report and "for 'sm_90'" in report
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs <= 64, f"{regs} registers: more than a 128-thread block should need"


def _libasan():
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


ASAN_SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
from mcf_fast import masking as mk
op = torch.ops.mcf_fast.random_masks
shapes = [(3, 1, 1, 1), (5, 16, 12, 3), (7, 10, 10, 2), (4, 196, 49, 2), (2, 197, 19, 2),
          (0, 5, 2, 2), (700, 196, 49, 2), (2, 4096, 2048, 1)]
for N, L, K, V in shapes:
    ids = torch.arange(N) * 13 + 2**47
    got = op(ids, L, K, V, -5, 2**32 - 1)
    want = mk._random_masks_torch(ids, L, K, V, 2**64 - 5, 2**32 - 1)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), (N, L, K, V)
bad = [(torch.arange(4), 196, 0, 1, 0, 0), (torch.arange(4), 196, 197, 1, 0, 0),
       (torch.tensor([-1]), 8, 2, 1, 0, 0), (torch.arange(4), 2**31, 3, 1, 0, 0)]
for args in bad:
    try:
        op(*args)
        raise SystemExit(f"no error for {args[1:]}")
    except RuntimeError:
        pass
print("ASAN_RUN_OK")
"""


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="gcc with libasan not found")
def test_asan_build_runs_clean(tmp_path):
    """The CPU op built with -fsanitize=address runs every shape and bad input without a report."""
    env = dict(os.environ, MCF_FAST_BUILD_CUDA="0", MCF_FAST_ASAN="1")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib",
                            str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    so = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "lib") for f in fs
          if f.startswith("_C") and f.endswith(".so")]
    assert len(so) == 1, so
    syms = subprocess.run(["nm", "-D", so[0]], capture_output=True, text=True, check=False).stdout
    assert "__asan_report" in syms, "the build is not instrumented"
    script = tmp_path / "run.py"
    script.write_text(ASAN_SCRIPT)
    # Python itself is not instrumented: preload the runtime, and libstdc++ so that ASan's
    # __cxa_throw interceptor finds the real one (else the first C++ exception aborts).
    libstdcxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, check=False).stdout.strip()
    run_env = dict(os.environ, LD_PRELOAD=f"{_libasan()} {libstdcxx}",
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, str(script), so[0]], env=run_env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0 and "ASAN_RUN_OK" in run.stdout, run.stderr[-4000:]
    assert "AddressSanitizer" not in run.stderr, run.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: the CUDA part is never tried")
def test_cuda_build_failure_keeps_the_cpu_part(tmp_path):
    """auto mode: a CUDA part that does not build (here: an arch nvcc rejects) leaves a working CPU
    extension and one '[mcf_fast setup]' line with the reason; MCF_FAST_BUILD_CUDA=1 fails instead."""
    env = dict(os.environ, MCF_FAST_BUILD_CUDA="auto", MCF_FAST_CUDA_ARCH="1")
    args = [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
            "--build-temp", str(tmp_path / "tmp")]
    build = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400, check=False)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-3000:]
    assert log.count("the CUDA part of mcf_fast._C did not build") == 1, log[-3000:]
    so = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "lib") for f in fs if f.startswith("_C")]
    assert len(so) == 1, so
    probe = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
             "print(len(torch.ops.mcf_fast.random_masks(torch.arange(3), 16, 4, 1, 0, 0)[0][0]))")
    run = subprocess.run([sys.executable, "-c", probe, so[0]], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr[-2000:]
    strict = subprocess.run(args, cwd=ROOT, env=dict(env, MCF_FAST_BUILD_CUDA="1"), capture_output=True,
                            text=True, timeout=2400, check=False)
    assert strict.returncode != 0
