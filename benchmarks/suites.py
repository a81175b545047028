"""The kernels, masks and data suites of benchmarks/run.py: the providers and correctness checks come
from bench_kernels.py / bench_masks.py / bench_data.py (their authors' baselines); the timing, the
memory and the report rows come from harness.py, so every suite is measured the same way.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
from report import row  # noqa: E402

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed(fn, setup, device, reps, warmup):
    """(summary stats, peak bytes of one more call) for fn(*setup())."""
    setup = setup or (lambda: ())
    stats = H.summarize(H.measure(fn, setup, warmup=warmup, reps=reps, device=device))
    args = setup()
    return stats, H.peak_bytes(lambda: fn(*args), device)


def _pool(make, n=3):
    """Fresh random inputs per call without paying generation inside the timed region: a small pool
    of distinct input sets, handed out in turn."""
    sets, i = [make(s) for s in range(n)], [0]

    def setup():
        i[0] += 1
        return sets[i[0] % n]
    return setup


# ----------------------------------------------------------------------------- kernels
def kernels(device: torch.device, quick: bool) -> list[dict]:
    import bench_kernels as BK
    import mcf_fast.kernels as K
    K.set_backend("auto")
    ours = "mcf_fast[triton]" if device.type == "cuda" else "mcf_fast[cpu]"
    reps, warm = (5, 1) if quick else (10, 1)
    N = 32 if quick else 256
    rows = []
    for dname in (("fp32",) if quick else ("fp32", "bf16")):
        dt = _DT[dname]
        L, D, Dd, ratio = 196, 768, 512, 0.75
        kk = int(L * (1 - ratio))

        def g_inputs(s):
            ids = BK._masks(N, L, ratio, seed=s)[0].to(device)
            x = torch.randn(N, L, D, dtype=dt, device=device, requires_grad=True)
            cls = torch.randn(1, 1, D, dtype=dt, device=device, requires_grad=True)
            pos = torch.randn(1 + L, D, dtype=dt, device=device)
            return x, ids, pos, cls, torch.randn(N, 1 + kk, D, dtype=dt, device=device)

        def s_inputs(s):
            restore = BK._masks(N, L, ratio, seed=s)[1].to(device)
            t = torch.randn(N, 1 + kk, Dd, dtype=dt, device=device, requires_grad=True)
            m = torch.randn(1, 1, Dd, dtype=dt, device=device, requires_grad=True)
            pos = torch.randn(1 + L, Dd, dtype=dt, device=device)
            return t, restore, m, pos, torch.randn(N, 1 + L, Dd, dtype=dt, device=device)

        cases = [("gather_visible", f"N={N} L={L} D={D} r={ratio}", g_inputs, BK.mae_encoder_input, K.gather_visible,
                  "MAE add+gather(repeat)+cat", (0, 3)),
                 ("scatter_to_full", f"N={N} L={L} Dd={Dd} r={ratio}", s_inputs, BK.mae_decoder_unshuffle,
                  K.scatter_to_full, "MAE repeat+cat+gather+cat+add", (0, 2))]
        for op, shape, make, base_fn, our_fn, base_name, wrt in cases:
            setup = _pool(make)
            a = setup()
            H.check_equal(f"{op} forward", our_fn(*a[:4]), base_fn(*a[:4]))
            gb = torch.autograd.grad(base_fn(*a[:4]), [a[i] for i in wrt], a[4])
            go = torch.autograd.grad(our_fn(*a[:4]), [a[i] for i in wrt], a[4])
            for x, y in zip(go, gb):  # sums over N in another order: close, not bit-equal; atol scaled
                tol = 1e-2 if dname == "bf16" else 1e-5  # to the gradient, since a sum's error grows with its terms
                H.check_close(f"{op} backward", x.float(), y.float(), rtol=tol, atol=tol * float(y.abs().max()) + 1e-12)
            for mode in ("fwd", "fwd+bwd"):
                for prov, fn, is_base in ((base_name, base_fn, True), (ours, our_fn, False)):
                    if mode == "fwd":
                        def call(*a, fn=fn):
                            with torch.no_grad():
                                fn(*a[:4])
                    else:
                        def call(*a, fn=fn):
                            torch.autograd.grad(fn(*a[:4]), [a[i] for i in wrt], a[4])
                    st, pk = _timed(call, setup, device, reps, warm)
                    rows.append(row("kernels", f"{op} {mode}", shape, dname, prov, is_baseline=is_base, stats=st,
                                    peak_bytes=pk))
    rows += _info_nce_rows(device, quick, reps, warm, ours)
    if device.type != "cuda":
        rows.append(row("kernels", "gather/scatter/info_nce", "as above", "bf16", "mcf_fast[triton]", note=H.NO_GPU))
    return rows


def _info_nce_rows(device, quick, reps, warm, ours) -> list[dict]:
    """info_nce: the contrastive loss without the [N, M] logits vs full logits + cross_entropy."""
    import bench_kernels as BK
    import mcf_fast.kernels as K
    rows = []
    n = 1024 if quick else 4096
    C, T, scale = 256, 0.2, 0.4

    def nce_inputs(s):
        g = torch.Generator().manual_seed(100 + s)
        return (torch.randn(n, C, generator=g).to(device).requires_grad_(True), torch.randn(n, C, generator=g).to(device))
    setup = _pool(nce_inputs)
    q, k = setup()
    H.check_close("info_nce", K.info_nce(q, k, T, 0, scale), BK.naive_info_nce(q, k, T, scale), rtol=1e-4, atol=1e-6)
    for prov, fn, is_base in (("full logits + cross_entropy", lambda q, k: BK.naive_info_nce(q, k, T, scale), True),
                              (ours, lambda q, k: K.info_nce(q, k, T, 0, scale), False)):
        for mode in ("fwd", "fwd+bwd"):
            def call(q, k, fn=fn, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        fn(q, k)
                else:
                    torch.autograd.grad(fn(q, k), [q])
            st, pk = _timed(call, setup, device, reps, warm)
            rows.append(row("kernels", f"info_nce {mode}", f"N=M={n} C={C}", "fp32", prov, is_baseline=is_base,
                            stats=st, peak_bytes=pk))
    return rows


# ----------------------------------------------------------------------------- masks
def _mae_masks_on(device, N, L, K, views):
    """bench_masks.mae_recipe, with every tensor on `device` (theirs builds the mask on the CPU)."""
    R = views * N
    ids_shuffle = torch.argsort(torch.rand(R, L, device=device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(R, L, dtype=torch.bool, device=device)
    mask[:, :K] = False
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :K].reshape(views, N, K), ids_restore.reshape(views, N, L), mask.reshape(views, N, L)


def masks(device: torch.device, quick: bool) -> list[dict]:
    import bench_masks as BM

    from mcf_fast import masking as mk
    shapes = [(256, 196)] if quick else [(256, 196), (1024, 196), (256, 784)]
    reps, warm = (10, 2) if quick else (40, 3)
    ratio, views = 0.75, 2
    backend = "extension" if mk._use_extension(device) else "torch fallback"
    rows = []
    for N, L in shapes:
        BM.check_providers(N, L, ratio, views)  # on the CPU: ours == fallback == MAE fed our noise, bit-exact
        K = mk.num_kept(L, ratio)
        step = [0]

        def ours():
            step[0] += 1  # a new step each call: fresh masks, as in training
            return mk.random_masks(N, L, ratio, views=views, seed=0, step=step[0],
                                   sample_ids=torch.arange(N, device=device), device=device)
        provs = [("MAE torch.rand+argsort", (lambda: BM.providers(N, L, ratio, views)["mae_argsort"]())
                  if device.type == "cpu" else (lambda: _mae_masks_on(device, N, L, K, views)), True),
                 (f"mcf_fast[{backend}]", ours, False)]
        if device.type == "cpu" and not quick:
            provs.append(("mcf_fast[torch fallback]", lambda: mk._random_masks_torch(
                torch.arange(N), L, K, views, 0, 1), False))
        for name, fn, is_base in provs:
            st, pk = _timed(fn, None, device, reps, warm)
            rows.append(row("masks", "random masks, 2 views", f"N={N} L={L} r={ratio}", "int64", name,
                            is_baseline=is_base, stats=st, peak_bytes=pk))
    if device.type != "cuda":
        rows.append(row("masks", "random masks, 2 views", "as above", "int64", "mcf_fast[cuda]", note=H.NO_GPU))
    return rows


# ----------------------------------------------------------------------------- data
def data(device: torch.device, quick: bool) -> list[dict]:
    """images/s of raw decode, the torch loader (baseline) and DALI, via bench_data's functions;
    each repetition is one of their timed runs (their own warm-up inside)."""
    import bench_data as BD
    num, batch, steps, reps, procs = (128, 16, 4, 2, 2) if quick else (1024, 64, 12, 3, 2)
    pattern = BD.make_shards(os.path.join(tempfile.gettempdir(), f"mcf_bench_data_{num}"), num=num)
    jpegs = BD._jpegs(pattern)
    try:
        import nvidia.dali  # noqa: F401
        have_dali = True
    except ImportError:
        have_dali = False
    if have_dali:
        BD.check_providers(pattern, procs)  # same ids in the same order, pixels within the filters' difference
    from mcf_fast.data.decode import available_decoders
    dec = available_decoders()[0]
    provs = [("torch loader", lambda: BD.bench_loader(pattern, "torch", procs, batch, steps), True),
             (f"raw decode[{dec}] x{procs} (ceiling)", lambda: BD.bench_raw_decode(jpegs, dec, procs), False)]
    if have_dali:
        provs += [("dali_cpu (mcf_fast order)", lambda: BD.bench_loader(pattern, "dali", procs, batch, steps), False),
                  ("dali_reader (DALI's own)", lambda: BD.bench_dali_reader(pattern, procs, batch, steps), False)]
    rows = []
    for name, fn, is_base in provs:
        rates = [fn() for _ in range(reps)]
        ms = [batch / r * 1e3 for r in rates]
        rows.append(row("data", "JPEG 256px -> normalised 224 batch", f"batch {batch}, {procs} procs", "float32", name,
                        is_baseline=is_base, stats=H.summarize(ms), images_per_s=statistics.median(rates),
                        note=f"{statistics.median(rates):.0f} images/s; memory n/a (worker processes)"))
    if not have_dali:
        rows.append(row("data", "JPEG 256px -> normalised 224 batch", f"batch {batch}", "float32", "dali",
                        note="not measured: nvidia-dali is not installed (pip install '.[dali]')"))
    rows.append(row("data", "JPEG 256px -> normalised 224 batch", f"batch {batch}", "float32", "dali (GPU decode)",
                    note=H.NO_GPU if device.type != "cuda" else "not measured: bench_data.py has no GPU-decode provider"))
    return rows


__all__ = ["kernels", "masks", "data"]
