"""mcf_fast._C is there when it must be: under MCF_FAST_REQUIRE_EXT=1 (set by .ci/run) a missing
extension, or a missing CUDA part where nvcc and a CUDA torch were present at build time, is a
failure, not a skip. Also: the extension imports in a fresh interpreter on its own."""
import os
import shutil

import pytest
import torch

REQUIRED = os.environ.get("MCF_FAST_REQUIRE_EXT", "0") == "1"


def _cuda_expected():
    """nvcc and a CUDA build of torch: what setup.py's auto mode needs to build the CUDA part."""
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else "")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return bool(nvcc) and os.path.exists(nvcc) and torch.version.cuda is not None


def _import_ext():
    try:
        from mcf_fast import _C
        return _C, None
    except ImportError as e:
        return None, e


def test_extension_present_when_required():
    """MCF_FAST_REQUIRE_EXT=1: `import mcf_fast._C` must work (else the CI run fails here)."""
    ext, err = _import_ext()
    if ext is None and not REQUIRED:
        pytest.skip(f"mcf_fast._C not built ({err}); MCF_FAST_REQUIRE_EXT=1 makes this a failure")
    assert ext is not None, (f"mcf_fast._C is not importable ({err}) but MCF_FAST_REQUIRE_EXT=1: build it with "
                             "`pip install -v --no-build-isolation -e .` and read the '[mcf_fast setup]' lines")
    assert hasattr(torch.ops.mcf_fast, "random_masks")


def test_cuda_part_present_when_expected():
    """MCF_FAST_REQUIRE_EXT=1 with nvcc and a CUDA torch: the CUDA part (sm_90) must have been built."""
    ext, err = _import_ext()
    if not REQUIRED:
        pytest.skip("MCF_FAST_REQUIRE_EXT is not 1")
    if not _cuda_expected():
        pytest.skip("no nvcc or a CPU-only torch: the CUDA part is not expected")
    assert ext is not None, f"mcf_fast._C is not importable: {err}"
    assert ext.WITH_CUDA == 1, ("mcf_fast._C was built without its CUDA part although nvcc and a CUDA torch are "
                                "here: `MCF_FAST_BUILD_CUDA=1 pip install -v --no-build-isolation -e .` says why")


def test_extension_imports_in_a_fresh_interpreter(fresh_child):
    """`import mcf_fast._C` as a fresh interpreter's first import works: the package loads torch (libc10.so)
    first. (The interpreter is conftest's `fresh_child`, shared with other checks that need one.)"""
    if _import_ext()[0] is None and not REQUIRED:
        pytest.skip("mcf_fast._C not built")
    ext = fresh_child.get("ext", {})
    assert fresh_child["rc"] == 0 and ext.get("ok") and "with_cuda" in ext, (ext, fresh_child["stderr"])
