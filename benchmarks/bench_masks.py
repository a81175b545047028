"""Random-mask generation: mcf_fast.masking.random_masks vs MAE's recipe, on CPU.

MAE's recipe (models_mae.py `random_masking`), for all V * N rows at once (one call for both
views, which favours the baseline): noise = torch.rand; ids_shuffle = argsort(noise);
ids_restore = argsort(ids_shuffle); ids_keep = ids_shuffle[:, :K]; mask = gather(ones with K
zeros, ids_restore). Before timing, `check_providers` proves the baseline computes the same
function: fed noise = our ids_restore it reproduces our ids_keep, ids_restore and mask exactly.

Importable (`cases`, `bench_case`, `run`, `to_markdown`) for benchmarks/run.py;
`python benchmarks/bench_masks.py [--threads 2] [--json out.json]` prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from mcf_fast import masking as mk

CASES = [(n, l) for l in (196, 784) for n in (64, 256, 1024)]


def mae_recipe(N, L, K, views, noise=None):
    """MAE's masking for V * N rows -> (ids_keep, ids_restore, mask) shaped [V, N, ...]."""
    R = views * N
    if noise is None:
        noise = torch.rand(R, L)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    mask = torch.ones(R, L, dtype=torch.bool)
    mask[:, :K] = False
    mask = torch.gather(mask, 1, ids_restore)
    return (ids_keep.reshape(views, N, K), ids_restore.reshape(views, N, L),
            mask.reshape(views, N, L))


def providers(N, L, ratio, views, seed=0):
    """name -> zero-argument callable producing (ids_keep, ids_restore, mask) for 2 views."""
    K = mk.num_kept(L, ratio)
    ids = torch.arange(N, dtype=torch.int64)
    out = {"mae_argsort": lambda: mae_recipe(N, L, K, views)}
    step = [0]

    def ours():
        step[0] += 1  # a fresh step each call, as in training
        return mk.random_masks(N, L, ratio, views=views, seed=seed, step=step[0], sample_ids=ids)

    out["mcf_fast"] = ours
    out["mcf_fast_torch_fallback"] = lambda: mk._random_masks_torch(ids, L, K, views, seed, 1)
    return out


def check_providers(N, L, ratio, views):
    """Assert every provider computes the same function as the reference before any timing."""
    K = mk.num_kept(L, ratio)
    ours = mk.random_masks(N, L, ratio, views=views, seed=0, step=1)
    fallback = mk._random_masks_torch(torch.arange(N), L, K, views, 0, 1)
    noise = ours.ids_restore.reshape(views * N, L).double()  # argsort(noise) = our ids_shuffle
    mae = mae_recipe(N, L, K, views, noise=noise)
    for name, other in (("torch fallback", fallback), ("MAE recipe", mae)):
        for field, a, b in zip(mk.Masks._fields, ours, other):
            if not torch.equal(a, b):
                raise AssertionError(f"{name} differs from mcf_fast in {field} at N={N} L={L}")


def _summary(ts):
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [ts[0], ts[len(ts) // 2], ts[-1]]
    return {"median_ms": 1e3 * statistics.median(ts), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2],
            "repeat": len(ts)}


def _time_interleaved(fns, repeat, warmup=3):
    """Time providers round-robin, so that load from other processes hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: _summary(t) for name, t in ts.items()}


def bench_case(N, L, ratio=0.75, views=2, threads=2, repeat=30, fallback=True):
    """Time every provider on one shape; returns a dict with per-provider timings and speed-up."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_providers(N, L, ratio, views)
        res = {"N": N, "L": L, "ratio": ratio, "views": views, "threads": threads}
        fns = providers(N, L, ratio, views)
        slow = fns.pop("mcf_fast_torch_fallback")
        res.update(_time_interleaved(fns, repeat))
        if fallback:  # ~100x slower: a few repeats are enough
            res.update(_time_interleaved({"mcf_fast_torch_fallback": slow}, max(3, repeat // 10), 1))
        res["speedup_vs_mae"] = res["mae_argsort"]["median_ms"] / res["mcf_fast"]["median_ms"]
        return res
    finally:
        torch.set_num_threads(old)


def machine_info():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
    except OSError:
        sha = ""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0], "git": sha,
            "backend": "extension" if mk._use_extension(torch.device("cpu")) else "torch fallback"}


def run(cases=CASES, threads=2, repeat=30, fallback=True):
    return {"machine": machine_info(),
            "rows": [bench_case(n, l, threads=threads, repeat=repeat, fallback=fallback)
                     for n, l in cases]}


def to_markdown(result):
    def cell(t):
        return f"{t['median_ms']:.3f} ({t['q1_ms']:.3f}-{t['q3_ms']:.3f})"

    lines = ["| N | L | MAE argsort ms | mcf_fast ms | speed-up | torch fallback ms |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        fb = cell(r["mcf_fast_torch_fallback"]) if "mcf_fast_torch_fallback" in r else "-"
        lines.append(f"| {r['N']} | {r['L']} | {cell(r['mae_argsort'])} | {cell(r['mcf_fast'])} "
                     f"| {r['speedup_vs_mae']:.1f}x | {fb} |")
    m = result["machine"]
    lines.append("")
    lines.append(f"median (interquartile range) over the repeats, providers interleaved; "
                 f"views=2, ratio=0.75, "
                 f"{result['rows'][0]['threads']} threads; torch {m['torch']}, {m['cores']} cores, "
                 f"1-min load {m['loadavg_1m']:.1f}, git {m['git']}, masks via {m['backend']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-fallback", action="store_true", help="skip timing the torch fallback")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    result = run(threads=args.threads, repeat=args.repeat, fallback=not args.no_fallback)
    print(to_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
