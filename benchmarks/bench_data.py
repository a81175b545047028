"""Data-path throughput: 256-px JPEG face crops -> 224 normalised training tensors.

Providers, all on the same validated shards (synthetic faces written by `mcf_fast.data.synthetic`):
- raw_decode[<decoder>]: JPEG bytes already in memory -> uint8 RGB, nothing else (the ceiling of a
  CPU loader), with 1 process and with P processes;
- torch_loader: `build_pretrain_loader(loader="torch")`, P DataLoader workers (read, decode, resize,
  flip; normalise in the main process);
- dali_cpu: `build_pretrain_loader(loader="dali")` on CPU (device_id=None, P threads): our order via
  external_source, decode + resize + crop_mirror_normalize in DALI;
- dali_reader: DALI's own fn.readers.webdataset pipeline (same decode/augment, DALI's shuffling);
- synthetic_draw: `draw_face` at 128 px, one core (the issue's >= 1000 faces/s goal).
Before timing, `check_providers` proves the loaders compute the same thing: same ids in the same
order from torch and DALI, pixels within the resize filters' difference.

Importable (`make_shards`, `bench_raw_decode`, `bench_loader`, `bench_dali_reader`, `bench_synthetic`,
`run`, `to_markdown`); `python benchmarks/bench_data.py [--procs 2] [--num 1024] [--json out.json]`.
Rates are images/s, median of `--repeats` runs; CPU time rates say how much one core does.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import tempfile
import time


def make_shards(out: str, num: int = 1024, size: int = 256, shard_size: int = 256) -> str:
    """Validated synthetic shards of `num` faces at `size` px; returns the brace pattern."""
    from mcf_fast.data.synthetic import main as synth
    if not os.path.exists(os.path.join(out, "manifest.json")):
        synth(["--out", out, "--num", str(num), "--size", str(size), "--format", "wds",
               "--shard-size", str(shard_size)])
    n = len([f for f in os.listdir(out) if f.endswith(".tar")])
    return os.path.join(out, f"faces-{{000000..{n - 1:06d}}}.tar")


def _jpegs(pattern: str) -> list[bytes]:
    from mcf_fast.data.sources import open_source
    src = open_source(pattern, seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    return [src.read(i)[0] for i in range(src.num_samples)]


def _decode_all(args):
    data, decoder = args
    from mcf_fast.data.decode import decode_rgb
    for d in data:
        decode_rgb(d, decoder)
    return len(data)


def bench_raw_decode(jpegs, decoder: str, procs: int = 1) -> float:
    """Images/s decoding in-memory JPEGs with `decoder` over `procs` processes."""
    if procs == 1:
        _decode_all((jpegs[:32], decoder))
        t = time.perf_counter()
        _decode_all((jpegs, decoder))
        return len(jpegs) / (time.perf_counter() - t)
    chunks = [(jpegs[i::procs], decoder) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_all, [(c[0][:8], decoder) for c in chunks])  # warm the workers
        t = time.perf_counter()
        n = sum(pool.map(_decode_all, chunks))
        return n / (time.perf_counter() - t)


def _loader(pattern, backend, procs, batch, size=224, **kw):
    from mcf_fast.data import DataConfig, build_pretrain_loader
    cfg = DataConfig(path=pattern, loader=backend, workers=procs, img_size=size, **kw)
    return build_pretrain_loader(cfg, batch_size=batch, seed=0, drop_last=True)


def bench_loader(pattern, backend, procs=2, batch=64, steps=12, warmup=3) -> float:
    """Images/s delivered by build_pretrain_loader (normalised float tensors on the CPU)."""
    loader = _loader(pattern, backend, procs, batch)
    for _ in range(warmup):
        next(loader)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(loader)
    rate = steps * batch / (time.perf_counter() - t)
    assert b.images.shape == (batch, 3, 224, 224)
    loader.close()
    return rate


def cpu_ms_per_image(pattern, backend, batch=64, steps=6) -> float:
    """CPU milliseconds per delivered image with everything in this process (torch: workers=0; DALI:
    one thread): the work per image, which shared-machine contention distorts far less than rates."""
    loader = _loader(pattern, backend, 0 if backend == "torch" else 1, batch)
    next(loader)
    next(loader)
    c = time.process_time()
    for _ in range(steps):
        next(loader)
    ms = (time.process_time() - c) * 1000 / (steps * batch)
    loader.close()
    return ms


def cpu_ms_raw_decode(jpegs, decoder) -> float:
    c = time.process_time()
    _decode_all((jpegs, decoder))
    return (time.process_time() - c) * 1000 / len(jpegs)


def bench_dali_reader(pattern, procs=2, batch=64, steps=12, warmup=3) -> float:
    """Images/s of DALI's native fn.readers.webdataset pipeline (CPU)."""
    from mcf_fast.data.dali import webdataset_reader_pipeline
    from mcf_fast.data.sources import expand_shards
    pipe = webdataset_reader_pipeline(expand_shards(pattern), batch, 224, num_threads=procs)
    for _ in range(warmup):
        pipe.run()
    t = time.perf_counter()
    for _ in range(steps):
        out = pipe.run()[0]
    assert tuple(out.as_tensor().shape()) == (batch, 3, 224, 224)
    rate = steps * batch / (time.perf_counter() - t)
    del pipe
    return rate


def bench_synthetic(size=128, n=400) -> dict:
    """Faces/s of draw_face on one core: wall clock and per CPU-second."""
    from mcf_fast.data.synthetic import draw_face
    draw_face(0, 0, size)
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        draw_face(1, i, size)
    return {"wall": n / (time.perf_counter() - t), "cpu": n / (time.process_time() - c)}


def check_providers(pattern, procs=2, batch=8):
    """torch and DALI loaders: same ids, same order, pixels within the resize filters' difference."""
    import torch
    a, b = _loader(pattern, "torch", procs, batch), _loader(pattern, "dali", procs, batch)
    for _ in range(2):
        x, y = next(a), next(b)
        assert torch.equal(x.sample_ids, y.sample_ids), "DALI and torch loaders disagree on the order"
        err = float((x.images - y.images).abs().mean())
        assert err < 0.05, f"DALI and torch pixels differ by {err:.3f} (normalised units)"
    a.close()
    b.close()
    return err


def check_cuda(pattern, procs=2, batch=32) -> dict:
    """Torch loader onto a CUDA device (uint8 over the bus, normalised on the GPU, pinned memory)
    equals the CPU-device loader (normalised in the workers); also the rate delivered to the GPU."""
    import torch
    out = {}
    for name, path in (("synthetic", ""), ("shards", pattern)):
        kw = dict(synthetic_size=256) if path == "" else {}
        a = _loader(path, "torch", procs, batch, **kw)
        b = _loader(path, "torch", procs, batch, **kw)
        b.close()
        from mcf_fast.data import DataConfig, build_pretrain_loader
        b = build_pretrain_loader(DataConfig(path=path, loader="torch", workers=procs, img_size=224, **kw),
                                  batch_size=batch, seed=0, device="cuda")
        worst = 0.0
        for _ in range(3):
            x, y = next(a), next(b)
            assert y.images.is_cuda and y.sample_ids.is_cuda
            assert torch.equal(x.sample_ids, y.sample_ids.cpu())
            worst = max(worst, float((x.images - y.images.cpu()).abs().max()))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            y = next(b)
        torch.cuda.synchronize()
        out[name] = {"max_abs_diff_cpu_vs_cuda": worst, "images_per_s_to_gpu": 10 * batch / (time.perf_counter() - t)}
        a.close()
        b.close()
    return out


def run(procs=2, num=1024, repeats=3, batch=64, steps=12, workdir=None) -> dict:
    from mcf_fast.data.decode import available_decoders
    workdir = workdir or os.path.join(tempfile.gettempdir(), f"mcf_bench_data_{num}")
    pattern = make_shards(workdir, num=num)
    jpegs = _jpegs(pattern)
    res = {"machine": _machine(), "procs": procs, "num": num, "batch": batch, "rates": {}}
    have_dali = res["machine"]["dali"] is not None
    if have_dali:
        res["check_mean_abs_diff"] = check_providers(pattern, procs)

    def med(fn):
        vals = [fn() for _ in range(repeats)]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    for dec in available_decoders():
        res["rates"][f"raw_decode[{dec}] x1"] = med(lambda dec=dec: bench_raw_decode(jpegs, dec, 1))
    best = max((k for k in res["rates"]), key=lambda k: res["rates"][k]["median"])
    best_dec = best[len("raw_decode["):best.index("]")]
    res["rates"][f"raw_decode[{best_dec}] x{procs}"] = med(lambda: bench_raw_decode(jpegs, best_dec, procs))
    res["rates"]["torch_loader"] = med(lambda: bench_loader(pattern, "torch", procs, batch, steps))
    if have_dali:
        res["rates"]["dali_cpu"] = med(lambda: bench_loader(pattern, "dali", procs, batch, steps))
        res["rates"]["dali_reader"] = med(lambda: bench_dali_reader(pattern, procs, batch, steps))
    res["cpu_ms_per_image"] = {f"raw_decode[{best_dec}]": min(cpu_ms_raw_decode(jpegs, best_dec) for _ in range(repeats)),
                               "torch_loader (in-process)": min(cpu_ms_per_image(pattern, "torch") for _ in range(repeats))}
    if have_dali:
        res["cpu_ms_per_image"]["dali_cpu (1 thread)"] = min(cpu_ms_per_image(pattern, "dali") for _ in range(repeats))
    syn = [bench_synthetic() for _ in range(repeats)]
    res["synthetic_128"] = {k: statistics.median(s[k] for s in syn) for k in ("wall", "cpu")}
    res["best_decoder"] = best_dec
    return res


def _machine():
    import torch
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = "?"
    try:
        from nvidia import dali
        dv = dali.__version__
    except ImportError:
        dv = None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "dali": dv, "git": sha, "loadavg": os.getloadavg()[0]}


def to_markdown(res) -> str:
    r = res["rates"]
    torch_rate = r["torch_loader"]["median"]
    raw = r[f"raw_decode[{res['best_decoder']}] x{res['procs']}"]["median"]
    lines = [f"| provider ({res['procs']} procs/threads, batch {res['batch']}) | images/s (median) | min-max | "
             "vs torch loader | vs raw decode |", "|---|---:|---:|---:|---:|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v['median']:.0f} | {v['min']:.0f}-{v['max']:.0f} | "
                     f"{v['median'] / torch_rate:.2f}x | {v['median'] / raw:.2f}x |")
    lines.append("\n| work per image, one process (CPU ms/image, best of repeats) | ms |\n|---|---:|")
    for k, v in res.get("cpu_ms_per_image", {}).items():
        lines.append(f"| {k} | {v:.2f} |")
    s = res["synthetic_128"]
    lines.append(f"\nsynthetic faces at 128 px, one core: {s['wall']:.0f}/s wall, {s['cpu']:.0f}/s per CPU-second")
    m = res["machine"]
    lines.append(f"\nmachine: {m['cpu_count']} CPUs, load average {m['loadavg']:.1f} at start, torch {m['torch']}, "
                 f"DALI {m['dali']}, git {m['git']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cuda", action="store_true", help="also check/measure the torch loader onto CUDA")
    a = ap.parse_args()
    res = run(a.procs, a.num, a.repeats, a.batch, a.steps, a.workdir)
    if a.cuda:
        res["cuda"] = check_cuda(make_shards(a.workdir or os.path.join(tempfile.gettempdir(),
                                                                       f"mcf_bench_data_{a.num}"), a.num), a.procs)
        print(json.dumps(res["cuda"], indent=1))
    print(to_markdown(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
