"""The suites' baselines are the project's own references, every provider is checked against them before
timing, and a suite that runs out of budget says so row by row (nothing here depends on machine load)."""
import os

import pytest
import torch

from benchmarks import suite_kernels as SK
from benchmarks import suite_masks as SM
from benchmarks import suite_step as SS
from benchmarks.budget import Budget
from benchmarks.harness import ProviderMismatch

CPU = torch.device("cpu")


def test_kernel_baselines_are_the_references():
    """Each kernels case times the package's own statement of MAE as its baseline: the kernels' *_ref
    functions and the reference step's masking, not a copy made for the benchmark."""
    import mcf_fast.kernels as K

    from mcf_fast.model.reference import mae_masking
    refs = {c.op: c.reference for c in SK.cases(4, ("fp32",), 8)}
    assert refs == {"gather_visible": K.gather_visible_ref, "scatter_to_full": K.scatter_to_full_ref,
                    "random_masking": mae_masking, "info_nce": K.info_nce_ref}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_kernel_case_passes_its_check(dtype):
    """At small shapes, every op equals its reference (bit-exact forward for data movement, gradients
    within tolerance), so the suite's check lets it through to timing."""
    for case in SK.cases(4, (dtype,), 16):
        SK.check(case, *SK.pool(case, CPU)())


def test_a_provider_that_does_less_work_is_refused():
    """A gather that skips the position add (less work than the reference) fails the check."""
    import dataclasses
    case = next(c for c in SK.cases(4, ("fp32",), 8) if c.op == "gather_visible")
    lazy = dataclasses.replace(case, ours=lambda x, ids, pos, cls: case.reference(x, ids, None, cls))
    with pytest.raises(ProviderMismatch, match="gather_visible forward"):
        SK.check(lazy, *SK.pool(lazy, CPU)())


def test_mask_baseline_reproduces_our_masks():
    """Fed noise = our ids_restore, the reference step's MAE masking gives our ids_keep, ids_restore and
    mask bit for bit (and so does the pure-torch fallback)."""
    SM.check(8, 20, 0.75, 2)
    keep, restore, mask = SM.mae_masks(3, 20, 0.75, 2, CPU)
    assert keep.shape == (2, 3, 5) and restore.shape == mask.shape == (2, 3, 20)
    assert bool((mask.sum(-1) == 15).all()) and mask.dtype == torch.bool


@pytest.mark.parametrize("suite", [SK, SM])
def test_a_spent_budget_skips_every_case_by_name(suite):
    """With no budget left a suite measures nothing: each row says 'not measured' with the reason, and
    the budget's list names every case it skipped."""
    b = Budget(0.0)
    rows = suite.run(CPU, True, b)
    measured = [r for r in rows if r["median_ms"]]
    assert not measured and b.skipped
    assert all(r["note"].startswith("not measured: ") for r in rows)
    assert any("spent" in r["note"] for r in rows)


def _fake_peaks(device, quick, budget):
    return {p: {"flops": 1e11, "tflops": 0.1} for p in ("fp32", "bf16")}


def test_step_children_folder_is_removed_also_on_error(monkeypatch):
    """The children's temporary folder is gone after the suite, when a child fails and when the suite
    itself is interrupted by an error; a failed child is a FAILED row, a stopped one names the budget."""
    monkeypatch.setattr(SS, "peaks", _fake_peaks)
    seen = []

    def failing_then_stopped(spec, tmpdir, timeout_s):
        seen.append(tmpdir)
        assert spec["deadline"] > 0 and timeout_s >= SS.CHILD_MIN_S
        if spec["precision"] == "fp32":
            return {"preset": spec["preset"], "precision": "fp32", "failed": True, "skipped": "FAILED: boom"}
        return {"preset": spec["preset"], "precision": "bf16", "skipped": "not measured: stopped at the end of its share"}
    b = Budget(600.0)
    res = SS.run(CPU, True, b, launcher=failing_then_stopped)
    notes = {(r["dtype"], r["provider"]): r["note"] for r in res["rows"] if r["extra"].get("preset") == "demo"}
    assert notes[("fp32", "engine")] == "FAILED: boom" and "stopped" in notes[("bf16", "engine")]
    assert b.skipped == ["step demo bf16 (stopped at the end of its share)"]
    assert len(set(seen)) == 1 and not os.path.exists(seen[0])

    def crash(spec, tmpdir, timeout_s):
        seen.append(tmpdir)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        SS.run(CPU, True, Budget(600.0), launcher=crash)
    assert not os.path.exists(seen[-1])


def test_step_configurations_that_cannot_start_are_skipped_with_the_reason(monkeypatch):
    """A configuration whose share of the budget is under what a child needs to start is not launched."""
    monkeypatch.setattr(SS, "peaks", _fake_peaks)
    b = Budget(5.0)
    res = SS.run(CPU, True, b, launcher=lambda *a: pytest.fail("launched without budget"))
    demo = [r for r in res["rows"] if r["extra"].get("preset") == "demo"]
    assert demo and all("a configuration needs" in r["note"] for r in demo)
    assert [s.split(" (")[0] for s in b.skipped] == ["step demo fp32", "step demo bf16"]


def test_step_rounds_stop_when_the_deadline_nears():
    """The step child alternates engine and reference steps and stops starting rounds once one would not
    fit before its deadline, keeping the rounds already timed (at least one)."""
    from benchmarks.step_child import _alternate
    order = []

    def step(name):
        def call():
            order.append(name)
            return {"total": 1.0}
        return call
    phases, _ = _alternate(step("e"), step("r"), warmup=1, reps=5, left=lambda: 1e9)
    assert order == ["e", "r"] * 6 and len(phases["engine"]) == len(phases["reference"]) == 5
    order.clear()
    phases, _ = _alternate(step("e"), step("r"), warmup=1, reps=5, left=lambda: -1.0)
    assert order == ["e", "r"] * 2 and len(phases["engine"]) == 1
