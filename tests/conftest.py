"""Shared test setup: a seeded RNG per test, the markers, and what keeps the session short: two CPU
ranks shared by the distributed tests, one fresh interpreter for the checks that need one, and the work
a few tests wait for (builds, measurements, whole commands) started in the background once the selected
tests are known, with the tests that read it run last (tests/background.py)."""
import json
import os
import sys

import background
import pytest
import torch
from runners import TwoRanks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_POOL = TwoRanks()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "benchmark: timing test, excluded from the default run")
    config.addinivalue_line("markers", "late: reads the result of work started in the background; runs after "
                                       "the other tests, so that the work overlaps them")
    config.addinivalue_line("markers", "fresh(*checks): reads these checks of tests/fresh_child.py (one fresh "
                                       "interpreter in the background, through the fresh_child fixture); runs late")


def _late(item) -> bool:
    return item.get_closest_marker("late") is not None or item.get_closest_marker("fresh") is not None


def pytest_collection_modifyitems(session, config, items):
    """The `late` and `fresh` tests go last, each group in collection order."""
    items[:] = [i for i in items if not _late(i)] + [i for i in items if _late(i)]


def pytest_collection_finish(session):
    """A test module may start slow work that depends on nothing else (a build, a measurement in its own
    process, a whole command) as soon as the selected tests are known: its `start_background(items)` gets
    its selected tests and queues the work (tests/background.py). The fresh interpreter is queued here
    too, with the checks the selected tests name; then the queue starts, the costliest work first."""
    if session.config.option.collectonly:
        return
    by_module = {}
    for item in session.items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "start_background"):
            by_module.setdefault(mod, []).append(item)
    if any("two_ranks" in i.fixturenames for i in session.items):
        _POOL.start()  # the ranks import torch while the first tests run
    for mod, items in by_module.items():
        mod.start_background(items)
    checks = sorted({c for i in session.items for m in i.iter_markers("fresh") for c in m.args})
    if checks:
        _start_fresh_child(checks)
    background.begin()


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
    """Two gloo ranks kept for the session (tests/runners.py: TwoRanks), started with the session when a
    selected test uses them, else on first use."""
    yield _POOL
    _POOL.close()


def _fresh_child(checks: list[str], env: dict) -> dict:
    p = background.run([sys.executable, os.path.join(ROOT, "tests", "fresh_child.py"), *checks], cwd=ROOT,
                       env=env, timeout=1800)
    res = {"rc": p.returncode, "stderr": p.stderr[-4000:]}
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        res.update(json.loads(lines[-1]))
    return res


def _start_fresh_child(checks: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from fresh_child import COST
    background.start("fresh_child", _fresh_child, checks, env, cost=sum(COST[c] for c in checks))


@pytest.fixture(scope="session")
def fresh_child(request):
    """tests/fresh_child.py run once, in the background, with every check the selected tests' `fresh`
    markers name: {'rc', 'stderr', and one result per check when rc is 0}."""
    if not background.started("fresh_child"):  # a test without the marker: all checks, now
        from fresh_child import CHECKS
        _start_fresh_child(list(CHECKS))
    return background.result("fresh_child")
