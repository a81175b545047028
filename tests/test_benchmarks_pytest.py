"""Kernel and mask timings as pytest-benchmark tests (marker `benchmark`: excluded from the default
run by `-m "not benchmark"`; run them with `python -m pytest -m benchmark --benchmark-only`).

Each provider is first checked against the reference, then timed on fresh inputs per round;
benchmarks/run.py remains the source of the report (same providers, same checks)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_kernels as BK  # noqa: E402
import bench_masks as BM  # noqa: E402
import harness as H  # noqa: E402
import mcf_fast.kernels as K  # noqa: E402

from mcf_fast import masking as mk  # noqa: E402

N, L, D, DD, RATIO = 64, 196, 768, 512, 0.75
KEPT = int(L * (1 - RATIO))
ROUNDS = dict(rounds=10, warmup_rounds=2)


@pytest.fixture(autouse=True)
def _cpu_backend():
    K.set_backend("auto")
    yield
    K.reset_backend()


def _gather_inputs(seed):
    ids = BK._masks(N, L, RATIO, seed=seed)[0]
    x = torch.randn(N, L, D, requires_grad=True)
    cls = torch.randn(1, 1, D, requires_grad=True)
    return (x, ids, torch.randn(1 + L, D), cls, torch.randn(N, 1 + KEPT, D)), {}


def _scatter_inputs(seed):
    restore = BK._masks(N, L, RATIO, seed=seed)[1]
    t = torch.randn(N, 1 + KEPT, DD, requires_grad=True)
    m = torch.randn(1, 1, DD, requires_grad=True)
    return (t, restore, m, torch.randn(1 + L, DD), torch.randn(N, 1 + L, DD)), {}


def _seeds():
    s = iter(range(10**6))
    return lambda: next(s)


@pytest.mark.benchmark(group="gather_visible fwd+bwd N=64 L=196 D=768 fp32")
@pytest.mark.parametrize("provider", ["mae", "mcf_fast"])
def test_bench_gather_visible(benchmark, provider):
    """gather_visible (CPU path) vs MAE's add + expanded gather + cat, forward and backward."""
    fn = K.gather_visible if provider == "mcf_fast" else BK.mae_encoder_input
    (x, ids, pos, cls, g), _ = _gather_inputs(0)
    H.check_equal("gather_visible", fn(x, ids, pos, cls), BK.mae_encoder_input(x, ids, pos, cls))
    seed = _seeds()
    benchmark.pedantic(lambda x, ids, pos, cls, g: torch.autograd.grad(fn(x, ids, pos, cls), (x, cls), g),
                       setup=lambda: _gather_inputs(seed()), **ROUNDS)


@pytest.mark.benchmark(group="scatter_to_full fwd+bwd N=64 L=196 Dd=512 fp32")
@pytest.mark.parametrize("provider", ["mae", "mcf_fast"])
def test_bench_scatter_to_full(benchmark, provider):
    """scatter_to_full (CPU path) vs MAE's repeat + cat + expanded gather + cat + add, fwd and bwd."""
    fn = K.scatter_to_full if provider == "mcf_fast" else BK.mae_decoder_unshuffle
    (t, restore, m, pos, g), _ = _scatter_inputs(0)
    H.check_equal("scatter_to_full", fn(t, restore, m, pos), BK.mae_decoder_unshuffle(t, restore, m, pos))
    seed = _seeds()
    benchmark.pedantic(lambda t, r, m, pos, g: torch.autograd.grad(fn(t, r, m, pos), (t, m), g),
                       setup=lambda: _scatter_inputs(seed()), **ROUNDS)


@pytest.mark.benchmark(group="info_nce fwd+bwd N=M=2048 C=256 fp32")
@pytest.mark.parametrize("provider", ["full_logits", "mcf_fast"])
def test_bench_info_nce(benchmark, provider):
    """info_nce (chunked, no [N, M] logits) vs full logits + cross_entropy, forward and backward."""
    def fn(q, k):
        if provider == "mcf_fast":
            return K.info_nce(q, k, 0.2, 0, 0.4)
        return BK.naive_info_nce(q, k, 0.2, 0.4)

    def inputs():
        return (torch.randn(2048, 256, requires_grad=True), torch.randn(2048, 256)), {}
    (q, k), _ = inputs()
    H.check_close("info_nce", fn(q, k), BK.naive_info_nce(q, k, 0.2, 0.4), rtol=1e-4, atol=1e-6)
    benchmark.pedantic(lambda q, k: torch.autograd.grad(fn(q, k), (q,)), setup=inputs, **ROUNDS)


@pytest.mark.benchmark(group="random masks, 2 views, N=256 L=196")
@pytest.mark.parametrize("provider", ["mae_argsort", "mcf_fast"])
def test_bench_random_masks(benchmark, provider):
    """random_masks (Philox + partial Fisher-Yates) vs MAE's torch.rand + two argsorts, 2 views."""
    BM.check_providers(256, L, RATIO, 2)
    fn = BM.providers(256, L, RATIO, 2)[provider]  # mcf_fast advances the step: fresh masks each call
    benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    assert mk.num_kept(L, RATIO) == KEPT
