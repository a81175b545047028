"""Build checks for csrc/: the CUDA part for sm_90 spills nothing and uses few registers; a CUDA part
that does not build leaves a working CPU extension (and fails the strict mode); an AddressSanitizer
build of the CPU op runs clean.

Compiling against torch's headers costs about half a minute a file on 2 cores, so the builds are
shared: the sm_90 check reads the install's own build when it is current (else compiles), and one
build makes the ASan-instrumented CPU part through setup.py's CUDA-failure fallback, the strict-mode
failure first so that the fallback's first attempt finds the C++ objects already built. That build
starts in the background as soon as the session knows it will run these tests (conftest), so its
compiles overlap the tests before it.
"""
import atexit
import contextlib
import glob
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FALLBACK_LINE = "the CUDA part of mcf_fast._C did not build"


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuda_buildable():
    return _nvcc() is not None and torch.version.cuda is not None


def _torch_includes():
    from torch.utils import cpp_extension
    try:
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6 spells it cuda=True
        return cpp_extension.include_paths(cuda=True)


def _libasan():
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=False).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


# ------------------------------------------------------------------ the CUDA part for sm_90
def _cuobjdump():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands = [shutil.which("cuobjdump"), os.path.join(home, "bin", "cuobjdump")]
    try:
        import triton  # ships one with its NVIDIA backend
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def _installed_resource_report():
    """cuobjdump's resource report of this tree's in-place mcf_fast._C when it can stand for a fresh
    compile: newer than every csrc/ file, with an sm_90 CUDA part. None otherwise (stale, CPU-only,
    built for other archs, no cuobjdump), and when MCF_FAST_PTXAS_REPORT asks for ptxas' own report."""
    sos = glob.glob(os.path.join(ROOT, "mcf_fast", "_C*.so"))
    tool = _cuobjdump()
    if os.environ.get("MCF_FAST_PTXAS_REPORT") or len(sos) != 1 or tool is None:
        return None
    newest_src = max(os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(CSRC, "*")))
    if os.stat(sos[0]).st_mtime_ns <= newest_src:
        return None
    out = subprocess.run([tool, "--dump-resource-usage", sos[0]], capture_output=True, text=True, check=False)
    report = out.stdout + out.stderr
    return report if out.returncode == 0 and "arch = sm_90" in report else None


def _nvcc_report(tmp_path):
    """Compile csrc/masks_cuda.cu for sm_90 with -Xptxas -v (about half a minute): ptxas' report."""
    cmd = [_nvcc(), "-c", os.path.join(CSRC, "masks_cuda.cu"), "-o", str(tmp_path / "m.o"),
           "-gencode", "arch=compute_90,code=sm_90", "-O3", "-std=c++20", "-Xptxas", "-v",
           "-DMCF_FAST_WITH_CUDA", "--expt-relaxed-constexpr", "--compiler-options", "-fPIC",
           "-I", CSRC, "-I", sysconfig.get_paths()["include"]]
    for inc in _torch_includes():
        cmd += ["-I", inc]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    report = out.stdout + out.stderr
    dest = os.environ.get("MCF_FAST_PTXAS_REPORT")
    if dest:
        with open(dest, "w") as f:
            f.write(report)
    assert out.returncode == 0, report[-4000:]
    return report


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: no CUDA headers")
def test_cuda_source_compiles_for_sm90(tmp_path):
    """csrc/masks_cuda.cu compiled for sm_90: no spills, no local stack, at most 64 registers (the current
    install's build read with cuobjdump, else a fresh nvcc -Xptxas -v compile)."""
    report = _installed_resource_report()
    if report is not None:
        print(report)  # the resource report, visible with -s / in CI logs
        usage = re.search(r"random_masks_kernel\w*:\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
        assert usage, report
        regs, stack, local = map(int, usage.groups())
        assert stack == 0 and local == 0, f"spills or local stack: {usage.group(0)}"
    else:
        report = _nvcc_report(tmp_path)
        print(report)  # the ptxas resource report
        assert "random_masks_kernel" in report and "for 'sm_90'" in report
        assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report), report
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs <= 64, f"{regs} registers: more than a 128-thread block should need"


# ------------------------------------------------------------------ the CPU part: fallback, strict, ASan
RUN_SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
from mcf_fast import masking as mk
op = torch.ops.mcf_fast.random_masks
print("PROBE", len(op(torch.arange(3), 16, 4, 1, 0, 0)[0][0]))
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
print("RUN_OK")
"""


_BG: dict = {}  # the background build: thread, tmp folder, and its result or error
_PROCS: list = []  # live subprocesses of that build, stopped if the session ends first


def _run(cmd, timeout=2400, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group (compilers included), killed if the session ends first."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **kw)
    _PROCS.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    finally:
        _PROCS.remove(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@atexit.register
def _stop_builds():
    for p in list(_PROCS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def _setup_py(tmp, env):
    p = _run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp / "lib"), "--build-temp",
              str(tmp / "tmp")], cwd=ROOT, env=env)
    return p.returncode, p.stdout + p.stderr


def _build_and_run(tmp: pathlib.Path, asan: str | None, cuda: bool) -> SimpleNamespace:
    """One CPU build for every check here: ASan-instrumented when gcc has libasan; with nvcc and a CUDA
    torch it is the auto mode's fallback after a CUDA part that cannot build (arch 1, which nvcc
    rejects at once), preceded by the strict mode's failing build in the same build folder; then the
    op runs every shape and bad input in one fresh interpreter."""
    env = dict(os.environ, MCF_FAST_ASAN="1" if asan else "0")
    res = SimpleNamespace(strict_rc=None, strict_log="")
    if cuda:
        env.update(MCF_FAST_CUDA_ARCH="1")
        res.strict_rc, res.strict_log = _setup_py(tmp, dict(env, MCF_FAST_BUILD_CUDA="1"))
        res.rc, res.log = _setup_py(tmp, dict(env, MCF_FAST_BUILD_CUDA="auto"))
    else:
        res.rc, res.log = _setup_py(tmp, dict(env, MCF_FAST_BUILD_CUDA="0"))
    res.so = [os.path.join(d, f) for d, _, fs in os.walk(tmp / "lib") for f in fs
              if f.startswith("_C") and f.endswith(".so")]
    if res.rc != 0 or len(res.so) != 1:
        return res
    res.syms = _run(["nm", "-D", res.so[0]], timeout=300).stdout
    script = tmp / "run.py"
    script.write_text(RUN_SCRIPT)
    run_env = dict(os.environ, PYTHONPATH=ROOT)
    if asan:
        # Python itself is not instrumented: preload the runtime, and libstdc++ so that ASan's
        # __cxa_throw interceptor finds the real one (else the first C++ exception aborts).
        libstdcxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so"], capture_output=True,
                                   text=True, check=False).stdout.strip()
        run_env.update(LD_PRELOAD=f"{asan} {libstdcxx}", ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    res.run = _run([sys.executable, str(script), res.so[0]], env=run_env, timeout=600)
    return res


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: when a selected test needs `cpu_part`,
    its build starts now in a thread. The compilers then use the core that the tests running first
    leave idle, instead of a minute of their own later; the fixture waits for what is left."""
    if "thread" in _BG or (items is not None and not any("cpu_part" in i.fixturenames for i in items)):
        return
    asan, cuda = _libasan(), _cuda_buildable()
    if asan is None and not cuda:
        return  # nothing to build: the fixture skips

    def work():
        try:
            _BG["res"] = _build_and_run(_BG["tmp"], asan, cuda)
        except BaseException as e:  # noqa: BLE001 - raised again in the fixture, in the test that needs it
            _BG["error"] = e

    _BG["tmp"] = pathlib.Path(tempfile.mkdtemp(prefix="mcf_build_"))
    _BG["thread"] = threading.Thread(target=work, name="mcf_fast build", daemon=True)
    _BG["thread"].start()


@pytest.fixture(scope="module")
def cpu_part():
    """The result of _build_and_run (started in the background by conftest, or here)."""
    start_background(None)
    if "thread" not in _BG:
        pytest.skip("neither gcc with libasan nor nvcc with a CUDA torch: no build to check")
    _BG["thread"].join()
    try:
        if "error" in _BG:
            raise _BG["error"]
        yield _BG["res"]
    finally:
        shutil.rmtree(_BG["tmp"], ignore_errors=True)


def _assert_built(res):
    assert res.rc == 0, res.log[-6000:]
    assert len(res.so) == 1, res.so
    assert res.run.returncode == 0 and "RUN_OK" in res.run.stdout, res.run.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="gcc with libasan not found")
def test_asan_build_runs_clean(cpu_part):
    """The CPU op built with -fsanitize=address runs every shape and bad input without a report."""
    _assert_built(cpu_part)
    assert "__asan_report" in cpu_part.syms, "the build is not instrumented"
    assert "AddressSanitizer" not in cpu_part.run.stderr, cpu_part.run.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: the CUDA part is never tried")
def test_cuda_build_failure_keeps_the_cpu_part(cpu_part):
    """auto mode: a CUDA part that does not build (here: an arch nvcc rejects) leaves a working CPU
    extension and one '[mcf_fast setup]' line with the reason; MCF_FAST_BUILD_CUDA=1 fails instead."""
    _assert_built(cpu_part)
    assert cpu_part.log.count(FALLBACK_LINE) == 1, cpu_part.log[-3000:]
    assert "PROBE 3" in cpu_part.run.stdout
    assert cpu_part.strict_rc != 0
    assert FALLBACK_LINE not in cpu_part.strict_log, cpu_part.strict_log[-3000:]
