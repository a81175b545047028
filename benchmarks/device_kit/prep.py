"""What the device check needs that the GPU machine lacks, made here where the registry is reachable.

`python -m benchmarks.device_check --prep` fills WHEELS (gpu_wheels/, git-ignored, carried to the
machine): the small pure-Python or manylinux cp312 wheels of the package's dependencies that the
machine's image does not hold, and GIT_SHA, since the copied tree there may have no git.
"""
import os
import subprocess
import sys
import zipfile

from .. import machine

WHEELS = os.path.join(machine.ROOT, "gpu_wheels")
CARRY_LIMIT = 64 * 2 ** 20
# Missing from the H200 machine's image (checked 2026-11-17), needed by the package
# (webdataset, braceexpand) or its face/decode path (simplejpeg). Pinned: one version of each.
PACKAGES = ("webdataset==1.0.2", "braceexpand==0.1.7", "simplejpeg==1.8.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def git_sha() -> str:
    """The commit of the tree: git if it runs, else .git/HEAD read directly, else the GIT_SHA file."""
    return machine.git_sha(short=False, recorded=os.path.join(WHEELS, "GIT_SHA"))


def _requires(whl: str) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def prep(packages=PACKAGES) -> int:
    """Download the wheels for CPython 3.12 on x86-64 Linux, check the size, record the git sha."""
    os.makedirs(WHEELS, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", WHEELS]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    rc = subprocess.run(cmd + list(packages), check=False).returncode
    if rc != 0:
        print(f"error: pip download failed (exit {rc}): is a package registry reachable from here?", file=sys.stderr)
        return 1
    with open(os.path.join(WHEELS, "GIT_SHA"), "w") as f:
        f.write(git_sha() + "\n")
    whls = sorted(w for w in os.listdir(WHEELS) if w.endswith(".whl"))
    size = sum(os.path.getsize(os.path.join(WHEELS, w)) for w in whls)
    for w in whls:
        print(f"  {w}: needs {', '.join(_requires(os.path.join(WHEELS, w))) or 'nothing'}")
    print(f"{len(whls)} wheels, {size / 2**20:.1f} MiB in {WHEELS} (copied with the working tree: kept "
          f"under {CARRY_LIMIT / 2**20:.0f} MiB in all); GIT_SHA recorded")
    return 0 if size < CARRY_LIMIT / 2 else 1


def write_teacher(path: str) -> str:
    """A random-weights ViT-B/16 state dict (timm key names) for vit-b-paper's checkpoint teacher."""
    import torch

    from mcf_fast.model.vit import VisionTransformer
    torch.manual_seed(0)
    torch.save(VisionTransformer().state_dict(), path)
    return path
