"""The `data` suite: 256-px JPEG face crops -> normalised 224 training batches, images/s.

Providers, all on the same validated shards (synthetic faces written by `mcf_fast.data.synthetic` into
a temporary folder that is removed afterwards, also on error):
- torch loader (the baseline): `build_pretrain_loader(loader="torch")`, P DataLoader workers (read,
  decode, resize, flip; normalise in the main process);
- raw decode (the ceiling of a CPU loader): JPEG bytes already in memory -> uint8 RGB, nothing else, P processes;
- dali_cpu: `build_pretrain_loader(loader="dali")` on CPU (P threads): our order via external_source,
  decode + resize + crop_mirror_normalize in DALI; dali_reader: DALI's own fn.readers.webdataset pipeline;
- synthetic faces: `draw_face` at 128 px on one core (no baseline: a rate).
Before timing, the torch and DALI loaders are checked to deliver the same ids in the same order, pixels
within the resize filters' difference. A loader is timed per batch (`next(loader)`) by the harness after
its workers are warm, a sample being the mean over several consecutive batches; raw decode per pass
over all images.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import tempfile

from . import harness as H
from .budget import Budget, BudgetSpent
from .machine import version
from .rows import row, unmeasured

WHAT = "JPEG 256px -> normalised 224 batch"
BASELINES = "data: the baseline is mcf_fast's torch DataLoader path (build_pretrain_loader(loader='torch'))."


def make_shards(out: str, num: int, size: int = 256, shard_size: int = 256) -> str:
    """Validated synthetic shards of `num` faces at `size` px in `out`; returns the brace pattern."""
    from mcf_fast.data.synthetic import main as synth
    synth(["--out", out, "--num", str(num), "--size", str(size), "--format", "wds", "--shard-size", str(shard_size)])
    n = len([f for f in os.listdir(out) if f.endswith(".tar")])
    return os.path.join(out, f"faces-{{000000..{n - 1:06d}}}.tar")


def jpegs(pattern: str) -> list[bytes]:
    from mcf_fast.data.sources import open_source
    src = open_source(pattern, seed=0, img_size=8, synthetic_size=1, cache_mb=0)
    return [src.read(i)[0] for i in range(src.num_samples)]


def _decode_all(args) -> int:
    data, decoder = args
    from mcf_fast.data.decode import decode_rgb
    for d in data:
        decode_rgb(d, decoder)
    return len(data)


def loader(pattern, backend, procs, batch, size=224, **kw):
    from mcf_fast.data import DataConfig, build_pretrain_loader
    cfg = DataConfig(path=pattern, loader=backend, workers=procs, img_size=size, **kw)
    return build_pretrain_loader(cfg, batch_size=batch, seed=0, drop_last=True)


def check_providers(pattern, procs=2, batch=8) -> float:
    """torch and DALI loaders: same ids, same order, pixels within the resize filters' difference."""
    a, b = loader(pattern, "torch", procs, batch), loader(pattern, "dali", procs, batch)
    try:
        for _ in range(2):
            x, y = next(a), next(b)
            H.check_equal("DALI loader sample order", y.sample_ids, x.sample_ids)
            err = float((x.images - y.images).abs().mean())
            if not err < 0.05:
                raise H.ProviderMismatch(f"DALI and torch pixels differ by {err:.3f} on average (normalised units)")
    finally:
        a.close()
        b.close()
    return err


def _batches(make, steps, reps, budget) -> list[float]:
    """ms per delivered batch of the loader `make()` returns, each sample the mean over `steps` consecutive
    batches after a warm-up pass: a loader's rate is what its workers sustain, not how fast a batch that
    was prefetched during the previous call is handed over. The loader is closed afterwards."""
    it = make()
    try:
        ms = H.measure({"pass": lambda: [next(it) for _ in range(steps)]}, warmup=1, reps=reps, budget=budget)["pass"]
        return [m / steps for m in ms]
    finally:
        getattr(it, "close", lambda: None)()


def _dali_reader(pattern, procs, batch):
    from mcf_fast.data.dali import webdataset_reader_pipeline
    from mcf_fast.data.sources import expand_shards
    pipe = webdataset_reader_pipeline(expand_shards(pattern), batch, 224, num_threads=procs)

    class Reader:  # the pipeline as an iterator of batches, like the loaders
        def __next__(self):
            return pipe.run()
    return Reader()


def _raw_decode(data, decoder, procs, reps, budget) -> list[float]:
    """ms per pass decoding all of `data` over `procs` worker processes (warmed before timing)."""
    chunks = [(data[i::procs], decoder) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_all, [(c[0][:8], decoder) for c in chunks])
        return H.measure({"decode": lambda: pool.map(_decode_all, chunks)}, warmup=0, reps=reps, budget=budget)["decode"]


def _synthetic_ms(n=100, size=128) -> list[float]:
    """ms per face drawn (a new face each call)."""
    from mcf_fast.data.synthetic import draw_face
    index = itertools.count()
    return H.measure({"draw": lambda: draw_face(1, next(index), size)}, warmup=2, reps=n)["draw"]


def run(device, quick: bool, budget: Budget) -> list[dict]:
    """images/s of the torch loader (baseline), raw decode, DALI (if installed), and synthetic faces."""
    num, batch, steps, reps, procs = (128, 16, 4, 3, 2) if quick else (1024, 64, 8, 5, 2)
    shape = f"batch {batch}, {procs} procs"
    have_dali = version("nvidia.dali") is not None
    from mcf_fast.data.decode import available_decoders
    dec = available_decoders()[0]
    names = [("torch loader", True), (f"raw decode[{dec}] x{procs} (ceiling)", False)]
    names += [("dali_cpu (mcf_fast order)", False), ("dali_reader (DALI's own)", False)] if have_dali else []
    if budget.spent():
        return unmeasured("data", WHAT, shape, "float32", names, budget.skip("data suite", "budget spent before it"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcf_bench_data_") as tmp:
        pattern = make_shards(tmp, num)
        data = jpegs(pattern)
        if have_dali:
            check_providers(pattern, procs)
        timers = {"torch loader": lambda: _batches(lambda: loader(pattern, "torch", procs, batch), steps, reps, budget),
                  names[1][0]: lambda: [m * batch / len(data) for m in _raw_decode(data, dec, procs, reps, budget)],
                  "dali_cpu (mcf_fast order)": lambda: _batches(lambda: loader(pattern, "dali", procs, batch), steps,
                                                                reps, budget),
                  "dali_reader (DALI's own)": lambda: _batches(lambda: _dali_reader(pattern, procs, batch), steps, reps,
                                                               budget)}
        for name, is_base in names:
            try:
                ms = timers[name]()  # ms per batch of `batch` images
            except BudgetSpent as e:
                rows += unmeasured("data", WHAT, shape, "float32", [(name, is_base)], budget.skip(f"data {name}", str(e)))
                continue
            st = H.summarize(ms)
            rows.append(row("data", WHAT, shape, "float32", name, is_baseline=is_base, stats=st,
                            images_per_s=batch / (st["median_ms"] / 1e3), note="memory n/a (worker processes)"))
    if not have_dali:
        rows.append(row("data", WHAT, f"batch {batch}", "float32", "dali",
                        note="not measured: nvidia-dali is not installed (pip install '.[dali]')"))
    if device.type != "cuda":
        rows.append(row("data", WHAT, f"batch {batch}", "float32", "dali (GPU decode)", note=H.NO_GPU))
    try:
        budget.require(2.0, "synthetic faces")
        st = H.summarize(_synthetic_ms(40 if quick else 200))
        rows.append(row("data", "synthetic face, 128 px, one core", "1 image", "uint8", "draw_face", stats=st,
                        images_per_s=1e3 / st["median_ms"], note=f"{1e3 / st['median_ms']:.0f} faces/s"))
    except BudgetSpent as e:
        rows.append(row("data", "synthetic face, 128 px, one core", "1 image", "uint8", "draw_face",
                        note=budget.skip("data synthetic faces", str(e))))
    return rows


__all__ = ["BASELINES", "make_shards", "jpegs", "loader", "check_providers", "run"]
