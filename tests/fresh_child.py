"""The checks that need an interpreter of their own, run in one (each start imports torch: seconds idle,
up to a minute under load). conftest's `fresh_child` runs this file once per session and hands its
JSON line to the tests:

    ext          `import mcf_fast._C` as the first import of the process works (the package loads torch
                 first, so the dynamic loader finds libc10.so): tests/test_ext_required.py
    nce_memory   info_nce's peak RSS against the naive path, measured on a heap that no other test has
                 grown (freed blocks the allocator keeps would hide new allocations from RSS):
                 tests/test_kernels_info_nce.py

Usage: python tests/fresh_child.py   (prints one JSON line; the project root must be importable)
"""
import json


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
    import torch

    import mcf_fast.kernels as K
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


def _guarded(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one check failing must not hide the others' results
        return {"failed": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    # order matters: the extension must be the process's first import from the project
    print(json.dumps({"ext": _guarded(ext), "nce_memory": _guarded(nce_memory)}))
