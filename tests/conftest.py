"""Shared test setup: a seeded RNG per test, and the `slow` / `gpu` / `benchmark` markers."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "benchmark: timing test, excluded from the default run")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def python_exe():
    return sys.executable
