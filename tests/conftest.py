"""Shared test setup: a seeded RNG per test, the `slow` / `gpu` / `benchmark` markers, and what keeps the
session short: two CPU ranks shared by the distributed tests, one fresh interpreter for the checks
that need one, and background set-up (builds) started once the selected tests are known."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "benchmark: timing test, excluded from the default run")


def pytest_collection_finish(session):
    """A test module may start slow set-up that depends on nothing else (a build) as soon as the selected
    tests are known: its `start_background(items)` gets its selected tests, and the work then overlaps
    the tests that run before it."""
    if session.config.option.collectonly:
        return
    by_module = {}
    for item in session.items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "start_background"):
            by_module.setdefault(mod, []).append(item)
    for mod, items in by_module.items():
        mod.start_background(items)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def python_exe():
    return sys.executable


@pytest.fixture(scope="session")
def two_ranks():
    """Two gloo ranks started on first use and kept for the session (tests/runners.py: TwoRanks)."""
    from runners import TwoRanks
    pool = TwoRanks()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def fresh_child():
    """tests/fresh_child.py run once: {'rc', 'stderr', and one result per check when rc is 0}."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fresh_child.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    res = {"rc": p.returncode, "stderr": p.stderr[-4000:]}
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        res.update(json.loads(lines[-1]))
    return res
