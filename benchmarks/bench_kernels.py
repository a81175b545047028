"""CPU benchmarks of mcf_fast.kernels against MAE's formulation and the naive InfoNCE, plus a
bytes-moved model of the GPU kernels.

    python benchmarks/bench_kernels.py [--quick] [--threads 2] [--json out.json]

For benchmarks/run.py: `cases(quick)` returns a list of zero-argument callables, each returning
one result dict ({"name", "baseline_ms", "ours_ms", "speedup", ...}); `gpu_bytes_model()` returns
the modelled rows. Every timed provider is first checked against the reference (a baseline doing
less work than the op would make the ratio a lie). Times are medians of `repeats` fwd+bwd runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mcf_fast.kernels as K
import torch


def _compare_ms(base_fn, ours_fn, repeats):
    """Median and spread (max - min) in ms of each, runs interleaved so that load from other
    processes on a shared machine hits both providers alike."""
    base_fn(), ours_fn()  # warm-up (allocator, first-touch, lazy init)
    tb, to = [], []
    for _ in range(repeats):
        for fn, ts in ((base_fn, tb), (ours_fn, to)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return (statistics.median(tb), max(tb) - min(tb)), (statistics.median(to), max(to) - min(to))


# MAE's formulation, restated (models_mae.py forward_encoder / forward_decoder, with its .repeat)
def mae_encoder_input(x, ids_keep, pos, cls):
    N, L, D = x.shape
    x = x + pos[1:].unsqueeze(0)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    c = (cls.reshape(1, 1, D) + pos[:1].unsqueeze(0)).expand(N, -1, -1)
    return torch.cat((c, x), 1)


def mae_decoder_unshuffle(tokens, ids_restore, mask_token, pos):
    N, T, Dd = tokens.shape
    mt = mask_token.reshape(1, 1, Dd).repeat(N, ids_restore.shape[1] + 1 - T, 1)
    x_ = torch.cat([tokens[:, 1:], mt], 1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))
    return torch.cat([tokens[:, :1], x_], 1) + pos.unsqueeze(0)


def _masks(N, L, ratio, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.rand(N, L, generator=g).argsort(1)
    restore = shuffle.argsort(1)
    return shuffle[:, :int(L * (1 - ratio))], restore


def _fwd_bwd(fn, args, grads_of, g):
    out = fn(*args)
    torch.autograd.grad(out, grads_of, g)


def bench_gather(N=256, L=196, D=768, ratio=0.75, dtype=torch.float32, repeats=5):
    """gather_visible (x, cls trainable; fixed sin-cos pos as MAE) vs MAE's add+gather+cat, fwd+bwd."""
    ids, _ = _masks(N, L, ratio)
    x = torch.randn(N, L, D, dtype=dtype, requires_grad=True)
    pos = torch.randn(1 + L, D, dtype=dtype)
    cls = torch.randn(1, 1, D, dtype=dtype, requires_grad=True)
    g = torch.randn(N, 1 + ids.shape[1], D, dtype=dtype)
    K.set_backend("cpu")
    assert torch.equal(K.gather_visible(x, ids, pos, cls), mae_encoder_input(x, ids, pos, cls))
    (base, base_sp), (ours, ours_sp) = _compare_ms(
        lambda: _fwd_bwd(mae_encoder_input, (x, ids, pos, cls), (x, cls), g),
        lambda: _fwd_bwd(K.gather_visible, (x, ids, pos, cls), (x, cls), g), repeats)
    return dict(name=f"gather_visible N={N} L={L} D={D} r={ratio} {str(dtype)[6:]}", baseline="MAE add+gather+cat",
                baseline_ms=base, baseline_spread_ms=base_sp, ours_ms=ours, ours_spread_ms=ours_sp,
                speedup=base / ours)


def bench_scatter(N=256, L=196, Dd=512, ratio=0.75, dtype=torch.float32, repeats=5):
    """scatter_to_full (tokens, mask_token trainable; fixed pos) vs MAE's repeat+cat+gather+cat+add."""
    _, restore = _masks(N, L, ratio)
    k = int(L * (1 - ratio))
    t = torch.randn(N, 1 + k, Dd, dtype=dtype, requires_grad=True)
    m = torch.randn(1, 1, Dd, dtype=dtype, requires_grad=True)
    pos = torch.randn(1 + L, Dd, dtype=dtype)
    g = torch.randn(N, 1 + L, Dd, dtype=dtype)
    K.set_backend("cpu")
    assert torch.equal(K.scatter_to_full(t, restore, m, pos), mae_decoder_unshuffle(t, restore, m, pos))
    (base, base_sp), (ours, ours_sp) = _compare_ms(
        lambda: _fwd_bwd(mae_decoder_unshuffle, (t, restore, m, pos), (t, m), g),
        lambda: _fwd_bwd(K.scatter_to_full, (t, restore, m, pos), (t, m), g), repeats)
    return dict(name=f"scatter_to_full N={N} L={L} Dd={Dd} r={ratio} {str(dtype)[6:]}",
                baseline="MAE repeat+cat+gather+cat+add", baseline_ms=base, baseline_spread_ms=base_sp,
                ours_ms=ours, ours_spread_ms=ours_sp, speedup=base / ours)


def mae_random_masking(x, mask_ratio, noise):
    """MAE's random_masking: argsort twice, gather with a repeated index, 0/1 mask gathered back."""
    N, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :keep] = 0
    return x_masked, torch.gather(mask, 1, ids_restore), ids_restore


def bench_random_masking(N=64, L=196, D=768, ratio=0.75, dtype=torch.float32, repeats=7):
    """K.random_masking (the patch_mae drop-in) vs MAE's random_masking, fwd+bwd through x_masked."""
    x = torch.randn(N, L, D, dtype=dtype, requires_grad=True)
    noise = torch.rand(N, L)
    g = torch.randn(N, int(L * (1 - ratio)), D, dtype=dtype)
    K.set_backend("cpu")
    assert all(torch.equal(a, b) for a, b in zip(K.random_masking(x, ratio, noise), mae_random_masking(x, ratio, noise)))
    (base, base_sp), (ours, ours_sp) = _compare_ms(
        lambda: _fwd_bwd(lambda *a: mae_random_masking(*a)[0], (x, ratio, noise), (x,), g),
        lambda: _fwd_bwd(lambda *a: K.random_masking(*a)[0], (x, ratio, noise), (x,), g), repeats)
    return dict(name=f"random_masking N={N} L={L} D={D} r={ratio} {str(dtype)[6:]}", baseline="MAE random_masking",
                baseline_ms=base, baseline_spread_ms=base_sp, ours_ms=ours, ours_spread_ms=ours_sp,
                speedup=base / ours)


def bench_pixel_first(N=32, img=224, p=16, D=768, ratio=0.75, repeats=3):
    """Encoder input stage fwd+bwd: MAE (embed all L patches, add pos, gather) vs gathering the
    pixel patches first and embedding only the K visible ones (same tokens up to matmul rounding)."""
    L = (img // p) ** 2
    ids, _ = _masks(N, L, ratio)
    imgs = torch.randn(N, 3, img, img)
    conv = torch.nn.Conv2d(3, D, p, p)
    pos = torch.randn(1 + L, D)
    cls = torch.randn(1, 1, D, requires_grad=True)
    K.set_backend("cpu")

    def mae():
        x = conv(imgs).flatten(2).transpose(1, 2)
        return mae_encoder_input(x, ids, pos, cls)

    def pixel_first():
        # [N, 3, H, W] -> [N, L, 3*p*p] in the conv weight's (c, kh, kw) order
        patches = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(N, L, 3 * p * p)
        vis = K.gather_visible(patches, ids)                    # no gradient: images are leaves
        tok = torch.nn.functional.linear(vis, conv.weight.reshape(D, -1), conv.bias)
        body = tok + pos[1:].index_select(0, ids.reshape(-1)).view(N, -1, D)
        c = (cls.reshape(1, 1, D) + pos[:1].unsqueeze(0)).expand(N, -1, -1)
        return torch.cat([c, body], 1)

    a, b = mae(), pixel_first()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    g = torch.randn_like(a)
    params = (conv.weight, conv.bias, cls)
    (base, base_sp), (ours, ours_sp) = _compare_ms(lambda: torch.autograd.grad(mae(), params, g),
                                                   lambda: torch.autograd.grad(pixel_first(), params, g), repeats)
    return dict(name=f"encoder input (patch embed + gather) N={N} D={D} r={ratio} float32",
                baseline="MAE conv on all L, +pos, gather", baseline_ms=base, baseline_spread_ms=base_sp,
                ours_ms=ours, ours_spread_ms=ours_sp, speedup=base / ours)


def naive_info_nce(q, k, T, scale):
    """The formulation MoCo v3 / MCF use: full logits, cross-entropy."""
    return K.info_nce_ref(q, k, T, 0, scale)


_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
import mcf_fast.kernels as K
which, N, M, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rd(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
g = torch.Generator().manual_seed(0)
q = torch.randn(N, C, generator=g).requires_grad_(True)
k = torch.randn(M, C, generator=g)
K.set_backend('cpu')
f = K.info_nce if which == 'ours' else K.info_nce_ref
f(q[:8], k[:16], 0.2, 0, 0.4).backward()   # warm-up on tiny inputs: lazy init outside the peak
q.grad = None
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak-RSS mark (Linux)
base = rd('VmRSS')
t0 = time.perf_counter()
loss = f(q, k, 0.2, 0, 0.4)
loss.backward()
dt = time.perf_counter() - t0
print(json.dumps(dict(peak_bytes=rd('VmHWM') - base, ms=dt * 1e3, loss=loss.item(),
                      gsum=q.grad.double().abs().sum().item())))
"""


def peak_info_nce(which, N, M, C, threads=2):
    """Run one fwd+bwd of info_nce ('ours') or the naive path ('naive') in a fresh process.

    Returns {"peak_bytes": peak RSS above the inputs, "ms": that run's time, "loss", "gsum"}.
    A fresh process per run keeps one measurement's freed pages out of the next one's peak.
    """
    out = subprocess.run([sys.executable, "-c", _CHILD, which, str(N), str(M), str(C), str(threads)],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_info_nce(N=4096, M=4096, C=256, repeats=3, threads=2):
    """Time (median in-process) and peak memory (fresh process) of info_nce vs the naive logits path."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, C, generator=g).requires_grad_(True)
    k = torch.randn(M, C, generator=g)
    K.set_backend("cpu")
    a, b = K.info_nce(q, k, 0.2, 0, 0.4), naive_info_nce(q, k, 0.2, 0.4)
    assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item()), (a.item(), b.item())
    (base, base_sp), (ours, ours_sp) = _compare_ms(
        lambda: naive_info_nce(q, k, 0.2, 0.4).backward(), lambda: K.info_nce(q, k, 0.2, 0, 0.4).backward(),
        repeats)
    pn, po = peak_info_nce("naive", N, M, C, threads), peak_info_nce("ours", N, M, C, threads)
    return dict(name=f"info_nce N={N} M={M} C={C} fp32", baseline="naive logits + cross_entropy",
                baseline_ms=base, baseline_spread_ms=base_sp, ours_ms=ours, ours_spread_ms=ours_sp,
                speedup=base / ours, baseline_peak_mib=pn["peak_bytes"] / 2**20,
                ours_peak_mib=po["peak_bytes"] / 2**20, memory_ratio=pn["peak_bytes"] / max(po["peak_bytes"], 1))


def gpu_bytes_model(N=256, L=196, D=768, Dd=512, ratio=0.75, elem=2, idx=8, hbm_tb_s=3.0):
    """Bytes each fused GPU kernel moves vs MAE's un-fused op sequence (model, not measured).

    elem: bytes per activation element (2 = bf16); idx: bytes per index (8 = int64 as MAE).
    Counts DRAM reads + writes of activations and indices, ignoring caches (pos tables are tiny).
    """
    k = int(L * (1 - ratio))
    E, kD, lD = elem, N * k * D, N * L * D
    rows = []
    # encoder input, forward: MAE = add pos to all L (r+w), build repeated index (w), gather (r idx, r, w),
    # cat with CLS (r+w); fused = read N*K rows + ids, write N*(1+K) rows
    mae_f = 2 * lD * E + kD * idx + (kD * idx + 2 * kD * E) + 2 * kD * E
    ours_f = kD * E + N * k * idx + N * (1 + k) * D * E
    rows.append(("gather_visible fwd", mae_f, ours_f))
    # backward (pos frozen, as in MAE): MAE = scatter_add into zeros (w full, r repeated idx, r/w rows);
    # fused = read the rows once, write every element of dx once, read the [N, L] int32 inverse map
    mae_b = lD * E + kD * idx + 2 * kD * E
    ours_b = N * (1 + k) * D * E + lD * E + N * L * 4
    rows.append(("gather_visible bwd", mae_b, ours_b))
    ld = N * (1 + L) * Dd
    # decoder un-shuffle forward: repeat mask (w), cat (r+w), repeated index (w), gather (r idx, r, w),
    # cat CLS (r+w), add pos (r+w); fused = read visible rows + ids, write the full output once
    mae_df = N * (L - k) * Dd * E + 2 * N * L * Dd * E + N * L * Dd * idx + (N * L * Dd * idx + 2 * N * L * Dd * E) \
        + 2 * ld * E + 2 * ld * E
    ours_df = (N * (1 + k) * Dd) * E + N * L * idx + ld * E
    rows.append(("scatter_to_full fwd", mae_df, ours_df))
    # backward: add (pass-through, pos frozen), gather bwd (zeros w, repeated idx r, scatter r/w),
    # repeat bwd (r masked rows), d tokens assembled from its two slices (r/w);
    # fused = read g once, write d tokens (d mask_token partial sums are negligible)
    mae_db = N * L * Dd * E + N * L * Dd * idx + 2 * N * L * Dd * E + N * (L - k) * Dd * E \
        + 2 * N * (1 + k) * Dd * E
    ours_db = ld * E + N * L * idx + N * (1 + k) * Dd * E
    rows.append(("scatter_to_full bwd", mae_db, ours_db))
    out = []
    for name, a, b in rows:
        out.append(dict(name=name, mae_mb=a / 1e6, fused_mb=b / 1e6, ratio=a / b,
                        mae_us_at_3tbs=a / (hbm_tb_s * 1e12) * 1e6, fused_us_at_3tbs=b / (hbm_tb_s * 1e12) * 1e6,
                        note="model, not measured"))
    return out


# ---------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists): Triton kernels vs MAE's formulation / the naive InfoNCE
def _do_bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_gpu_gather(N=256, L=196, D=768, ratio=0.75, dtype=torch.bfloat16, pos_dtype=torch.float32):
    """gather_visible fwd+bwd on CUDA (Triton) vs MAE's add+gather+cat, ms and effective GB/s."""
    dev = "cuda"
    ids = torch.rand(N, L, device=dev).argsort(1)[:, :int(L * (1 - ratio))]
    x = torch.randn(N, L, D, device=dev, dtype=dtype, requires_grad=True)
    pos = torch.randn(1 + L, D, device=dev, dtype=pos_dtype)
    cls = torch.randn(1, 1, D, device=dev, dtype=pos_dtype, requires_grad=True)
    K.set_backend("auto")
    out = K.gather_visible(x, ids, pos, cls)
    assert torch.equal(out, mae_encoder_input(x, ids, pos, cls))
    g = torch.randn_like(out)
    base = _do_bench(lambda: _fwd_bwd(mae_encoder_input, (x, ids, pos, cls), (x, cls), g))
    ours = _do_bench(lambda: _fwd_bwd(K.gather_visible, (x, ids, pos, cls), (x, cls), g))
    fwd = _do_bench(lambda: K.gather_visible(x.detach(), ids, pos, cls.detach()))
    moved = ids.numel() * D * (x.element_size() + 2 * out.element_size()) + N * L * D * x.element_size()
    return dict(name=f"[gpu] gather_visible N={N} D={D} x {str(dtype)[6:]} pos {str(pos_dtype)[6:]}",
                baseline_ms=base, ours_ms=ours, speedup=base / ours, ours_fwd_ms=fwd,
                ours_fwd_bwd_gbs=moved / ours / 1e6)


def bench_gpu_scatter(N=256, L=196, Dd=512, ratio=0.75, dtype=torch.bfloat16, pos_dtype=torch.float32):
    """scatter_to_full fwd+bwd on CUDA (Triton) vs MAE's repeat+cat+gather+cat+add."""
    dev = "cuda"
    k = int(L * (1 - ratio))
    restore = torch.rand(N, L, device=dev).argsort(1).argsort(1)
    t = torch.randn(N, 1 + k, Dd, device=dev, dtype=dtype, requires_grad=True)
    m = torch.randn(1, 1, Dd, device=dev, dtype=pos_dtype, requires_grad=True)
    pos = torch.randn(1 + L, Dd, device=dev, dtype=pos_dtype)
    K.set_backend("auto")
    out = K.scatter_to_full(t, restore, m, pos)
    assert torch.equal(out, mae_decoder_unshuffle(t, restore, m, pos))
    g = torch.randn_like(out)
    base = _do_bench(lambda: _fwd_bwd(mae_decoder_unshuffle, (t, restore, m, pos), (t, m), g))
    ours = _do_bench(lambda: _fwd_bwd(K.scatter_to_full, (t, restore, m, pos), (t, m), g))
    moved = 2 * (N * (1 + k) * Dd * t.element_size() + N * (1 + L) * Dd * out.element_size())
    return dict(name=f"[gpu] scatter_to_full N={N} Dd={Dd} tokens {str(dtype)[6:]} pos {str(pos_dtype)[6:]}",
                baseline_ms=base, ours_ms=ours, speedup=base / ours, ours_fwd_bwd_gbs=moved / ours / 1e6)


def bench_gpu_info_nce(N=4096, M=4096, C=256, dtype=torch.bfloat16):
    """info_nce fwd+bwd (d q) on CUDA (Triton) vs the naive logits path: ms and peak memory above inputs."""
    q = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(M, C, device="cuda", dtype=dtype)
    K.set_backend("auto")
    res = {}
    for name, f in (("naive", lambda: naive_info_nce(q, k, 0.2, 0.4)),
                    ("ours", lambda: K.info_nce(q, k, 0.2, 0, 0.4))):
        torch.autograd.grad(f(), q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.autograd.grad(f(), q)
        torch.cuda.synchronize()
        res[name + "_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        res[name + "_ms"] = _do_bench(lambda: torch.autograd.grad(f(), q))
    return dict(name=f"[gpu] info_nce N={N} M={M} C={C} {str(dtype)[6:]}", baseline_ms=res["naive_ms"],
                ours_ms=res["ours_ms"], speedup=res["naive_ms"] / res["ours_ms"],
                baseline_peak_mib=res["naive_peak_mib"], ours_peak_mib=res["ours_peak_mib"],
                memory_ratio=res["naive_peak_mib"] / max(res["ours_peak_mib"], 1e-9))


def gpu_cases() -> list:
    """GPU benchmark thunks (each returns one result dict); need CUDA and Triton."""
    return [bench_gpu_gather, lambda: bench_gpu_gather(pos_dtype=torch.bfloat16),
            bench_gpu_scatter, lambda: bench_gpu_scatter(pos_dtype=torch.bfloat16),
            bench_gpu_info_nce, lambda: bench_gpu_info_nce(N=4096, M=32768),
            lambda: bench_gpu_info_nce(dtype=torch.float32)]


def cases(quick: bool) -> list:
    """Benchmark thunks for benchmarks/run.py (quick: smaller shapes, fewer repeats)."""
    if quick:
        return [lambda: bench_random_masking(N=16, repeats=3),
                lambda: bench_gather(N=32, repeats=3), lambda: bench_scatter(N=32, repeats=3),
                lambda: bench_info_nce(N=1024, M=1024, repeats=2), lambda: bench_pixel_first(N=8, repeats=2)]
    return [bench_random_masking, lambda: bench_scatter(N=64),
            bench_gather, bench_scatter, lambda: bench_gather(dtype=torch.bfloat16),
            lambda: bench_scatter(dtype=torch.bfloat16), bench_info_nce, bench_pixel_first]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--gpu", action="store_true", help="run the CUDA/Triton benchmarks instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = []
    for c in (gpu_cases() if args.gpu else cases(args.quick)):
        try:
            res.append(c())
        except Exception as e:  # one broken case must not hide the others' numbers
            res.append(dict(name=repr(c), error=f"{type(e).__name__}: {e}", baseline_ms=float("nan"),
                            ours_ms=float("nan"), speedup=float("nan")))
            print("ERROR", res[-1]["error"], flush=True)
    for r in res:
        extra = f"  peak {r['baseline_peak_mib']:.0f} -> {r['ours_peak_mib']:.0f} MiB ({r['memory_ratio']:.1f}x less)" \
            if "memory_ratio" in r else ""
        print(f"{r['name']:<48} {r['baseline_ms']:9.3f} ms -> {r['ours_ms']:9.3f} ms  x{r['speedup']:.2f}{extra}")
    model = gpu_bytes_model()
    for m in model:
        print(f"{m['name']:<22} MAE {m['mae_mb']:8.1f} MB  fused {m['fused_mb']:7.1f} MB  x{m['ratio']:.1f}  "
              f"H100 @3TB/s {m['mae_us_at_3tbs']:6.1f} -> {m['fused_us_at_3tbs']:5.1f} us  ({m['note']})")
    meta = dict(torch=torch.__version__, threads=args.threads, cpu=os.cpu_count(), quick=args.quick,
                device=torch.cuda.get_device_name() if args.gpu else "cpu")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=res, gpu_model=model), f, indent=1)


if __name__ == "__main__":
    main()
