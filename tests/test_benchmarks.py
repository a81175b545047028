"""The benchmarks' one harness: timing (round-robin, fresh inputs, within a budget), memory, the provider
checks, FLOP counting, and the step suite timing the training step itself."""
import time

import numpy as np
import pytest
import torch

from benchmarks import harness as H
from benchmarks.budget import Budget, BudgetSpent
from benchmarks.flops import count_flops


def test_summary_matches_numpy_percentiles():
    """median / p20 / p80 are numpy's linear-interpolated percentiles of the samples."""
    s = list(np.random.default_rng(1).exponential(3.0, size=17))
    st = H.summarize(s)
    assert st["n"] == 17
    assert st["median_ms"] == pytest.approx(np.percentile(s, 50))
    assert st["p20_ms"] == pytest.approx(np.percentile(s, 20))
    assert st["p80_ms"] == pytest.approx(np.percentile(s, 80))


def test_measure_round_robin_on_fresh_inputs():
    """Each round calls every provider once, in turn, each call on its own setup() input (warm-up
    included); only the timed rounds are returned, and a 20 ms sleep reads as >= 20 ms."""
    calls, k = [], iter(range(100))

    def make(name):
        def fn(i):
            calls.append((name, i))
            time.sleep(0.02)
        return fn
    ms = H.measure({"a": make("a"), "b": make("b")}, lambda: (next(k),), warmup=1, reps=2)
    assert calls == [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4), ("b", 5)]
    assert set(ms) == {"a", "b"} and all(len(v) == 2 and all(19.0 <= m < 2000 for m in v) for v in ms.values())
    with pytest.raises(ValueError, match="reps"):
        H.measure({"a": make("a")}, reps=0)


def test_measure_refuses_what_the_budget_cannot_hold():
    """A measurement whose first round shows it cannot fit raises BudgetSpent after that one round;
    with the budget already spent, nothing is called at all."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.1)
    with pytest.raises(BudgetSpent, match="more rounds"):
        H.measure({"slow": slow}, warmup=1, reps=10, budget=Budget(0.5))
    assert len(calls) == 1
    with pytest.raises(BudgetSpent, match="spent before"):
        H.measure({"slow": slow}, reps=3, budget=Budget(0.0))
    assert len(calls) == 1


def test_measure_ends_early_when_load_slows_the_rounds():
    """Rounds that turn slower than the first one estimated end the measurement cleanly: at least
    min_reps samples are kept, and no round starts that would run past the budget."""
    delays, slept = iter([0.01] + [0.3] * 50), []

    def f():
        slept.append(next(delays))
        time.sleep(slept[-1])
    ms = H.measure({"f": f}, warmup=1, reps=20, budget=Budget(1.0), min_reps=3)
    assert 3 <= len(ms["f"]) < 20
    # what the rounds asked for, not the wall clock (a loaded machine only makes them end sooner): at most
    # one round past the budget, beyond the min_reps rounds it must keep
    assert sum(slept) <= max(1.0, 0.01 + 3 * 0.3) + 0.3 + 1e-9, slept


def test_budget_shares_keep_the_run_deadline():
    """A share is its weight's part of what is left, never ends after the run's deadline, and records
    what it skipped in the run's one list."""
    b = Budget(100.0)
    part = b.share(2, 10)
    assert part.seconds == pytest.approx(20.0, abs=0.5) and part.deadline <= b.deadline
    assert b.share(10, 10).deadline == pytest.approx(b.deadline, abs=0.5)
    assert part.skip("kernels op", "no time") == "not measured: no time" and b.skipped == ["kernels op (no time)"]
    with pytest.raises(BudgetSpent, match="needed"):
        Budget(1.0).require(5.0, "a step")


cpu_peak = pytest.mark.skipif(not H.cpu_peak_supported()[0], reason="no /proc/self/clear_refs (not Linux)")


@cpu_peak
def test_cpu_peak_sees_a_transient_allocation():
    """A call that touches 64 MiB and frees it peaks at ~64 MiB; a call that allocates nothing at ~0."""
    def alloc():
        t = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.5)
        return float(t[-1])
    got = H.peak_bytes(alloc) / 2**20
    assert 60 <= got <= 80, got
    assert H.peak_bytes(lambda: None) / 2**20 < 8


@cpu_peak
def test_cpu_peak_excludes_memory_live_before_the_call():
    """Memory held before the call does not count; only what the call adds on top."""
    held = torch.randn(24 * 2**20 // 4 * 4)  # ~96 MiB live before and during the call

    def alloc():
        t = torch.empty(4 * 2**20, dtype=torch.float32).fill_(2.0)
        return float(t[0] + held[0])
    got = H.peak_bytes(alloc) / 2**20
    assert 12 <= got <= 28, got


def test_other_load_excludes_our_own_work():
    """The other-processes share is a fraction of the machine in [0, 1] with our own busy loop
    subtracted (neighbours' load cannot be controlled here, so no tighter bound is asserted)."""
    from benchmarks.machine import OtherLoad
    ol = OtherLoad()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
        pass
    share = ol.share()
    if share is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= share <= 1.0


def test_checks_reject_a_provider_that_differs():
    """A provider that does less (or other) work than the reference, or returns another dtype, is
    refused before timing."""
    a = torch.randn(64)
    H.check_equal("same", (a, a.clone()), (a, a))
    with pytest.raises(H.ProviderMismatch, match="output 1"):
        H.check_equal("gather", (a, a[:32]), (a, a))
    with pytest.raises(H.ProviderMismatch, match="float64"):
        H.check_equal("mask", a.double(), a)
    b = a.clone()
    b[3] += 1e-3
    assert H.check_close("close", b, a, rtol=1e-2, atol=1e-2) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(H.ProviderMismatch, match="differs"):
        H.check_close("loss", b, a, rtol=1e-5, atol=1e-6)


def test_sdpa_flops_are_counted_on_cpu():
    """The CPU flash-attention op, invisible to torch's FlopCounterMode, is counted with torch's
    own SDPA formulas: 4 b h s^2 d forward, 10 b h s^2 d backward (scores recomputed)."""
    b, h, s, d = 2, 3, 40, 16
    q = torch.randn(b, h, s, d, requires_grad=True)

    def fn():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    got = count_flops(fn, [q])
    assert got["total"] == (4 + 10) * b * h * s * s * d
    assert q.grad is None  # the fake backward must not leave a gradient behind


def test_engine_step_is_the_training_step():
    """The step suite times mcf_fast.train.step.TrainStep itself: two timed steps leave the weights
    bit-equal to two plain TrainStep calls, and every phase is reported."""
    from benchmarks import engine as E
    from benchmarks.step_child import TimedTrainStep
    from mcf_fast.train.optim import build_optimizer
    from mcf_fast.train.runtime import Runtime
    from mcf_fast.train.step import TrainStep
    cfg = E.preset_config("demo")
    m = cfg.model
    m.depth, m.decoder_depth, m.teacher_depth, m.teacher_layers, m.proj_hidden = 1, 1, 1, (0,), 64
    cfg.data.synthetic_size = 16  # the loader draws its faces up front
    cpu = torch.device("cpu")
    timed_model, plain_model = E.build_model(m, 0).train(), E.build_model(m, 0).train()
    timed = TimedTrainStep(timed_model, cfg, E.loader(cfg, 2, cpu), cpu, "fp32")
    assert isinstance(timed.step, TrainStep)
    phases = [timed(), timed()]
    assert all(set(p) == {"data", "forward", "backward", "optimizer_ema", "total"} for p in phases)
    assert all(p["total"] == pytest.approx(sum(v for k, v in p.items() if k != "total")) for p in phases)
    opt = build_optimizer(plain_model, 1.5e-4, cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2), cpu)
    plain, batches = TrainStep(plain_model, opt, cfg, Runtime(cpu, "fp32", 0, 1, 0)), iter(E.loader(cfg, 2, cpu))
    for i in range(2):
        plain(batches, i, 1.5e-4, cfg.optim.momentum)
    for (name, a), b in zip(timed_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name
