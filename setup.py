"""Build and install mcf_fast.

`kernels/` is installed as `mcf_fast.kernels`; `csrc/` is compiled into `mcf_fast._C`, against the
torch already installed: install torch first, then this package with `--no-build-isolation`
(README.md, "Two commands"). pyproject.toml makes pip use the PEP 517/660 path, so the build runs
in the environment pip was started from; without torch there the install fails and says why.

Environment switches:
  MCF_FAST_BUILD_EXT=0          skip the C++ extension (masks fall back to pure torch, same numbers)
  MCF_FAST_BUILD_CUDA=auto|1|0  CUDA part: auto = try when nvcc and a CUDA torch exist, and keep the
                                CPU part if it does not build (the reason is printed); 1 = required
  MCF_FAST_CUDA_ARCH=90         SM architectures for the CUDA part (semicolon-separated)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
NO_TORCH = ("torch is not importable in the build environment ({err}). Install torch first "
            "(pip install \"torch>=2.4,<2.16\" setuptools wheel), then pip install --no-build-isolation -e . "
            "(without --no-build-isolation pip builds in an isolated environment that has no torch); "
            "or set MCF_FAST_BUILD_EXT=0 to install without the C++ mask generator")


BUILDS = ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install")


def _log(msg):
    # pip runs setup.py for metadata too: say the build plan only where something is built.
    if any(a in BUILDS for a in sys.argv[1:]):
        print(f"[mcf_fast setup] {msg}", file=sys.stderr, flush=True)


def _cudart_dir(cuda_home):
    """The folder holding libcudart.so: the toolkit's lib64, lib or targets/*/lib (CUDA 13 puts it
    in lib), else the runtime wheel torch brings (nvidia/cu13/lib or nvidia/cuda_runtime/lib)."""
    cands = [os.path.join(cuda_home, d) for d in ("lib64", "lib")]
    cands += sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "lib")))
    for d in cands:
        if os.path.exists(os.path.join(d, "libcudart.so")):
            return d, "cudart"
    try:
        import nvidia
        for root in nvidia.__path__:
            for so in sorted(glob.glob(os.path.join(root, "*", "lib", "libcudart.so.*"))):
                return os.path.dirname(so), ":" + os.path.basename(so)
    except ImportError:
        pass
    return None, None


def _cuda_plan(torch, cu):
    """(build CUDA?, cudart folder, cudart library name, why not)."""
    want = os.environ.get("MCF_FAST_BUILD_CUDA", "auto").lower()
    if want not in ("auto", "1", "0", "true", "false", "yes", "no"):
        raise SystemExit(f"MCF_FAST_BUILD_CUDA={want!r}: use auto, 1 or 0")
    if want in ("0", "false", "no"):
        return False, None, None, "MCF_FAST_BUILD_CUDA=0"
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else (shutil.which("nvcc") or "")
    libdir, lib = _cudart_dir(cuda_home) if cuda_home else (None, None)
    missing = [what for what, ok in (("nvcc (set CUDA_HOME)", os.path.exists(nvcc)),
                                     ("a CUDA build of torch", torch.version.cuda is not None),
                                     ("libcudart.so", libdir is not None), ("csrc/*.cu", bool(cu))) if not ok]
    if missing and want != "auto":
        raise SystemExit("MCF_FAST_BUILD_CUDA=1 but the CUDA part cannot be built: missing "
                         + ", ".join(missing) + ". Install them, or set MCF_FAST_BUILD_CUDA=0.")
    return not missing, libdir, lib, "missing " + ", ".join(missing)


def _extensions():
    if os.environ.get("MCF_FAST_BUILD_EXT", "1") == "0":
        _log("MCF_FAST_BUILD_EXT=0: not building mcf_fast._C (pure-torch mask fallback will be used)")
        return [], {}
    # Before torch.utils.cpp_extension reads it: that module guesses CUDA_HOME from the nvcc on PATH,
    # and a wrapper script in /usr/local/bin makes it guess /usr/local (no headers, no libcudart).
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(NO_TORCH.format(err=e)) from None
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    build_cuda, libdir, lib, why = _cuda_plan(torch, cu)
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers need C++20
    link = ["-fopenmp"]
    if os.environ.get("MCF_FAST_ASAN") == "1":
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
        link += ["-fsanitize=address"]
    cpu_ext = cpp_extension.CppExtension("mcf_fast._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not build_cuda:
        _log(f"building the CPU part of mcf_fast._C only ({why}); MCF_FAST_BUILD_CUDA=1 requires CUDA")
        return [cpu_ext], {"build_ext": _build_ext_class(cpp_extension, None)}
    archs = os.environ.get("MCF_FAST_CUDA_ARCH", "90").split(";")
    if not all(re.fullmatch(r"\d+[a-z]?", a) for a in archs):
        raise SystemExit(f"MCF_FAST_CUDA_ARCH={';'.join(archs)!r}: give SM numbers, e.g. 90 or 80;90 or 90a")
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    # -Xptxas -v: keep the register / spill report of every kernel in the build log.
    nvcc_flags = ["-O3", "-std=c++20", "-Xptxas", "-v", "-DMCF_FAST_WITH_CUDA", *gencode]
    ext = cpp_extension.CUDAExtension(
        "mcf_fast._C", cpp + cu, include_dirs=[os.path.join(HERE, "csrc")], library_dirs=[libdir],
        extra_compile_args={"cxx": cxx + ["-DMCF_FAST_WITH_CUDA"], "nvcc": nvcc_flags}, extra_link_args=link)
    ext.libraries = [lib if name == "cudart" else name for name in ext.libraries]
    _log(f"building mcf_fast._C with CUDA for sm_{',sm_'.join(archs)} (libcudart from {libdir})")
    strict = os.environ.get("MCF_FAST_BUILD_CUDA", "auto").lower() != "auto"
    return [ext], {"build_ext": _build_ext_class(cpp_extension, None if strict else cpu_ext)}


def _build_ext_class(cpp_extension, cpu_fallback):
    """torch's BuildExtension; with a fallback, a CUDA build that fails is replaced by the CPU part."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExt(base):
        # The fallback goes through torch's per-extension set-up (ABI flag, extension name) with the
        # CUDA one, and is built only if that one failed.
        def build_extensions(self):
            self._cuda_failed = False
            if cpu_fallback is None:
                return super().build_extensions()
            # setuptools' finalize_options gave the CUDA extension private fields (_needs_stub,
            # _full_name, ...); its CPU twin has the same name, so the same values.
            for key, val in vars(self.extensions[0]).items():
                if key.startswith("_") and not hasattr(cpu_fallback, key):
                    setattr(cpu_fallback, key, val)
            self.extensions.append(cpu_fallback)
            try:
                super().build_extensions()
            finally:  # same output file as the CUDA one; later steps (copy in place) list it once
                self.extensions.remove(cpu_fallback)

        def build_extension(self, ext):
            if ext is cpu_fallback:
                return super().build_extension(ext) if self._cuda_failed else None
            try:
                return super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compile or link error: keep the CPU part
                if cpu_fallback is None:
                    raise
                self._cuda_failed = True
                _log(f"the CUDA part of mcf_fast._C did not build ({type(e).__name__}: {str(e)[-300:]}); "
                     "building the CPU part only. pip install -v shows the compiler's output; "
                     "MCF_FAST_BUILD_CUDA=0 skips the attempt")

    return BuildExt


ext_modules, cmdclass = _extensions()
setup(
    name="mcf_fast",
    version="0.1.0",
    description="Fast, lean pre-training of face representations with MCF (Mask Contrastive Face)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["mcf_fast", "mcf_fast.model", "mcf_fast.data", "mcf_fast.train", "mcf_fast.eval", "mcf_fast.plan",
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
        # prepare's default face detector when MTCNN's weights are absent (LBP cascade): about 16 MB of
        # wheels (scikit-image 13.7, networkx 2.1, imageio 0.3, tifffile 0.2), 56 MB installed
        "scikit-image>=0.21",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=1.40"],
        "xformers": ["xformers>=0.0.28"],
        "faces": ["opencv-python-headless>=4.8", "simplejpeg>=1.7"],
        "dev": ["pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.80", "ruff>=0.4",
                "timm>=1.0", "opencv-python-headless>=4.8", "simplejpeg>=1.7",
                "lmdb>=1.4", "pyarrow>=14"],
    },
    entry_points={"console_scripts": ["mcf-pretrain=mcf_fast.pretrain:main", "mcf-eval=mcf_fast.eval.__main__:main"]},
)
