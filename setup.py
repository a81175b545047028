"""Build and install mcf_fast.

`kernels/` is installed as `mcf_fast.kernels`; `csrc/` is compiled into `mcf_fast._C`.
torch is imported at build time, so install torch first, then this package with
`--no-build-isolation` (see README.md).

Environment switches:
  MCF_FAST_BUILD_EXT=0        skip the C++ extension (masks fall back to pure torch, same numbers)
  MCF_FAST_BUILD_CUDA=auto|1|0  CUDA part of the extension: auto = when nvcc and a CUDA torch exist
  MCF_FAST_CUDA_ARCH=90       SM architectures for the CUDA part (semicolon-separated)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[mcf_fast setup] {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("MCF_FAST_BUILD_EXT", "1") == "0":
        _log("MCF_FAST_BUILD_EXT=0: not building mcf_fast._C (pure-torch mask fallback will be used)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: install torch first, then "
             "`pip install --no-build-isolation .` (skipping mcf_fast._C)")
        return [], {}

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    want_cuda = os.environ.get("MCF_FAST_BUILD_CUDA", "auto").lower()
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    have_nvcc = bool(nvcc) and os.path.exists(nvcc)
    have_cuda_torch = torch.version.cuda is not None
    build_cuda = False
    if want_cuda in ("1", "true", "yes"):
        if not (have_nvcc and have_cuda_torch and cu):
            raise RuntimeError(
                "MCF_FAST_BUILD_CUDA=1 but the CUDA part cannot be built: "
                f"nvcc found={have_nvcc}, torch CUDA build={have_cuda_torch}, csrc/*.cu={bool(cu)}. "
                "Install the CUDA toolkit (set CUDA_HOME) and a CUDA build of torch, or set MCF_FAST_BUILD_CUDA=0.")
        build_cuda = True
    elif want_cuda == "auto":
        build_cuda = have_nvcc and have_cuda_torch and bool(cu)
        if not build_cuda:
            _log(f"building the CPU extension only (nvcc found={have_nvcc}, "
                 f"torch CUDA build={have_cuda_torch}); set MCF_FAST_BUILD_CUDA=1 to require CUDA")

    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers need C++20
    link = ["-fopenmp"]
    if os.environ.get("MCF_FAST_ASAN") == "1":
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
        link += ["-fsanitize=address"]
    if build_cuda:
        archs = os.environ.get("MCF_FAST_CUDA_ARCH", "90").split(";")
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        # -Xptxas -v: keep the register / spill report of every kernel in the build log.
        nvcc_flags = ["-O3", "-std=c++20", "-Xptxas", "-v", "-DMCF_FAST_WITH_CUDA", *gencode]
        ext = cpp_extension.CUDAExtension(
            "mcf_fast._C", cpp + cu, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DMCF_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link)
        _log(f"building mcf_fast._C with CUDA for sm_{','.join(archs)}")
    else:
        ext = cpp_extension.CppExtension(
            "mcf_fast._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="mcf_fast",
    version="0.1.0",
    description="Fast, lean pre-training of face representations with MCF (Mask Contrastive Face)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mcf_fast", "mcf_fast.model", "mcf_fast.data", "mcf_fast.train", "mcf_fast.eval",
              "mcf_fast.kernels"],
    package_dir={"mcf_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4,<2.16",
        "numpy>=1.24",
        "pillow>=9.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "webdataset>=0.2.86",
        "braceexpand>=0.1.7",
        "scipy>=1.10",
        "matplotlib>=3.6",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.40"],
        "xformers": ["xformers>=0.0.28"],
        "faces": ["opencv-python-headless>=4.8", "simplejpeg>=1.7", "scikit-image>=0.21"],
        "dev": ["pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.80", "ruff>=0.4",
                "timm>=1.0", "scikit-image>=0.21", "opencv-python-headless>=4.8", "simplejpeg>=1.7",
                "lmdb>=1.4"],
    },
    entry_points={"console_scripts": ["mcf-pretrain=mcf_fast.pretrain:main", "mcf-eval=mcf_fast.eval.__main__:main"]},
)
