"""The checks that need an interpreter of their own, run in one (each start imports torch: seconds idle,
up to a minute under load). conftest starts this file once per session, in the background, with the
checks the selected tests name (`@pytest.mark.fresh(...)`), and hands its JSON line to them through the
`fresh_child` fixture:

    ext          `import mcf_fast._C` as the first import of the process works (the package loads torch
                 first, so the dynamic loader finds libc10.so): tests/test_ext_required.py
    nce_memory   info_nce's peak RSS against the naive path, measured on a heap that no other test has
                 grown (freed blocks the allocator keeps would hide new allocations from RSS):
                 tests/test_kernels_info_nce.py
    plan_demo,   a real CPU training step's peak bytes beside the plan's traced peak for the same step
    plan_vit_s   (demo batch 8, vit-s batch 8; fp32): tests/test_plan_trace.py. Here, no other test's
                 threads or heap can move the resident-set peak the measurement reads.

Usage: python tests/fresh_child.py [CHECK ...]   (default: all; prints one JSON line; the project root
must be importable). The checks run in the order above whatever the order given.
"""
import json
import sys


def ext() -> dict:
    """The first import from the project: the extension, alone."""
    try:
        import mcf_fast._C as c
    except ImportError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, "with_cuda": int(c.WITH_CUDA)}


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def nce_memory(N: int = 8192, C: int = 256) -> dict:
    """fwd+bwd at N = M = 8192, C = 256 on the CPU: {'ours'|'naive': {peak above base, loss, |d q|}}."""
    import mcf_fast.kernels as K
    import torch
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, C, generator=g).requires_grad_(True)
    k = torch.randn(N, C, generator=g)
    K.set_backend("cpu")
    res = {}
    # ours first: whatever small blocks the allocator keeps afterwards count in the naive run's base,
    # never in its peak above base
    for which, f in (("ours", K.info_nce), ("naive", K.info_nce_ref)):
        f(q[:4], k[:8], 0.2, 0, 0.4).backward()  # lazy initialisation outside the measured peak
        q.grad = None
        with open("/proc/self/clear_refs", "w") as cr:
            cr.write("5")  # reset VmHWM, the kernel's peak-RSS mark
        base = _rss("VmRSS")
        loss = f(q, k, 0.2, 0, 0.4)
        loss.backward()
        res[which] = dict(peak=_rss("VmHWM") - base, loss=loss.item(), g=q.grad.double().norm().item())
        del loss
        q.grad = None
    return res


def _plan_peak(preset: str, batch: int) -> dict:
    """{'measured', 'traced'}: bytes of one fp32 CPU step after a warm-up step (mcf_fast.plan.measure), and
    the plan's traced transient peak of that step (mcf_fast.plan.trace); a random teacher of the preset's size."""
    from mcf_fast.plan.measure import cpu_measurable, measure_step
    from mcf_fast.plan.trace import trace_step
    from mcf_fast.train.config import from_preset
    ok, why = cpu_measurable()
    if not ok:
        return {"skip": why}
    cfg = from_preset(preset)
    cfg.model.teacher = "random"
    cfg.optim.batch_size, cfg.optim.accum_steps = batch, 1
    traced = trace_step(cfg, "fp32").peak["all"]
    return {"traced": traced, "measured": measure_step(cfg, "fp32", "cpu", warmup=1)["peak_bytes"]}


CHECKS = {"ext": ext, "nce_memory": nce_memory,
          "plan_demo": lambda: _plan_peak("demo", 8), "plan_vit_s": lambda: _plan_peak("vit-s", 8)}
COST = {"ext": 3, "nce_memory": 5, "plan_demo": 3, "plan_vit_s": 50}  # rough CPU-seconds (background order)


def _guarded(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one check failing must not hide the others' results
        return {"failed": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(CHECKS)
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        sys.exit(f"fresh_child.py: unknown checks {unknown}; choose from {list(CHECKS)}")
    # order matters: the extension must be the process's first import from the project
    print(json.dumps({name: _guarded(fn) for name, fn in CHECKS.items() if name in wanted}))
