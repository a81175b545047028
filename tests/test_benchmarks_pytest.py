"""The kernels and masks suites' cases as pytest-benchmark tests (marker `benchmark`: excluded from the
default run by `-m "not benchmark"`; run them with `python -m pytest -m benchmark --benchmark-only`).

The same cases as `python -m benchmarks.run --suite kernels,masks` (benchmarks/suite_kernels.py,
suite_masks.py), at batch 64: each provider is checked against the reference first, then timed on fresh
inputs per round; the report of record remains `benchmarks.run`'s."""
import mcf_fast.kernels as K
import pytest
import torch

from benchmarks import suite_kernels as SK
from benchmarks import suite_masks as SM

CASES = {f"{c.op} {c.shape}": c for c in SK.cases(64, ("fp32",), 2048)}
ROUNDS = dict(rounds=10, warmup_rounds=2)
pytestmark = pytest.mark.benchmark


@pytest.fixture(autouse=True)
def _cpu_backend():
    K.set_backend("auto")
    yield
    K.reset_backend()


@pytest.mark.parametrize("provider", ["reference", "mcf_fast"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_kernel_fwd_bwd(benchmark, name, provider):
    """One kernel op (CPU path) vs its reference, forward + backward, after the suite's check."""
    case = CASES[name]
    benchmark.group = f"{name} fwd+bwd fp32"
    setup = SK.pool(case, torch.device("cpu"))
    SK.check(case, *setup())
    fn = SK.calls(case, case.ours if provider == "mcf_fast" else case.reference)["fwd+bwd"]
    benchmark.pedantic(fn, setup=lambda: (setup(), {}), **ROUNDS)


@pytest.mark.benchmark(group="random masks, 2 views, N=256 L=196")
@pytest.mark.parametrize("provider", ["MAE torch.rand+argsort", "mcf_fast[extension]"])
def test_bench_random_masks(benchmark, provider):
    """random_masks (Philox + partial Fisher-Yates) vs MAE's torch.rand + two argsorts, 2 views."""
    SM.check(256, 196, 0.75, 2)
    provs = SM.providers(256, 196, 0.75, 2, "cpu")
    if provider not in provs:
        pytest.skip(f"{provider} not available here (masks: {', '.join(provs)})")
    benchmark.pedantic(provs[provider][0], rounds=30, warmup_rounds=3)
