"""The light install of the kernels (kernels/pyproject.toml -> `mcf_fast_kernels`): torch and triton only.

The fresh-venv install itself (`pip install ./kernels`, pip list) is recorded in dev/notes/mae-dropins.md;
these tests pin what makes it work: kernels/ imports nothing outside torch, triton and the standard
library, the distribution declares nothing else, and the light copy loads beside mcf_fast.kernels.
"""
import ast
import os
import sys

import background
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "kernels")
ALLOWED = {"torch", "triton", "__future__"}


def _imports(path):
    """Top-level module names imported by one file (relative imports excluded)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_kernels_import_only_torch_triton_and_stdlib():
    """Every import in kernels/*.py is torch, triton, the standard library or a sibling module."""
    files = sorted(f for f in os.listdir(KDIR) if f.endswith(".py"))
    assert "mae_dropin.py" in files and "gather_scatter.py" in files
    bad = {f: sorted(m for m in set(_imports(os.path.join(KDIR, f)))
                     if m not in ALLOWED and m not in sys.stdlib_module_names) for f in files}
    assert not any(bad.values()), f"kernels/ must import only torch/triton/stdlib: {bad}"


def test_light_distribution_declares_only_torch_and_triton():
    """kernels/pyproject.toml: distribution mcf-fast-kernels, package mcf_fast_kernels, deps torch (+ triton)."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.load(open(os.path.join(KDIR, "pyproject.toml"), "rb"))
    deps = meta["project"]["dependencies"]
    names = sorted(d.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for d in deps)
    assert meta["project"]["name"] == "mcf-fast-kernels" and names == ["torch", "triton"]
    assert meta["tool"]["setuptools"]["packages"] == ["mcf_fast_kernels"]
    assert meta["tool"]["setuptools"]["package-dir"] == {"mcf_fast_kernels": "."}


CHILD = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("mcf_fast_kernels", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
light = importlib.util.module_from_spec(spec)
sys.modules["mcf_fast_kernels"] = light
spec.loader.exec_module(light)
assert "mcf_fast" not in sys.modules, "the light copy imported mcf_fast"
assert light.backend.OPS_NS == "mcf_fast_kernels" and hasattr(torch.ops.mcf_fast_kernels, "gather_visible_fwd")
import mcf_fast.kernels as full
assert full.backend.OPS_NS == "mcf_fast"
x = torch.randn(2, 16, 8, requires_grad=True)
noise = torch.rand(2, 16)
a, b = light.random_masking(x, 0.75, noise), full.random_masking(x, 0.75, noise)
assert all(torch.equal(u, v) for u, v in zip(a, b))
q, k = torch.randn(6, 8), torch.randn(6, 8)
assert torch.equal(light.info_nce(q, k, 0.2), full.info_nce(q, k, 0.2))
print("LIGHT OK")
"""


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the fresh interpreter is queued in the
    background (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_light_copy_loads_beside_the_full_package" for i in items):
        background.start("kernels_light", background.run, [sys.executable, "-c", CHILD, KDIR], 300, cost=3)


@pytest.mark.late
def test_light_copy_loads_beside_the_full_package():
    """kernels/ loaded as mcf_fast_kernels needs no mcf_fast, and coexists with mcf_fast.kernels (own op namespace;
    a fresh interpreter, started in the background with the session)."""
    start_background(None)  # (already started by conftest)
    out = background.result("kernels_light")
    assert "LIGHT OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
