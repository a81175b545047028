"""Every speed and memory claim of mcf_fast, measured in one process against the baseline a user
would otherwise run, on whatever machine it is given.

    python benchmarks/run.py --suite kernels|masks|data|step|all --device cpu|cuda --out DIR
                             [--quick] [--compare OLD.json] [--budget-s S] [--step-batch N]

Writes DIR/report.json, DIR/report.md, DIR/speedups.png and DIR/memory.png (ratio charts centred
at 1.0), with the step suite also DIR/step_phases.png and DIR/profile_step.txt, and prints the
Markdown report last. Every chart is written even when nothing could be measured (it says why);
a --quick run's demo configurations are measured whatever budget is left (load slows them, never
drops them); H100 projections are made for the paper-size preset only and labelled as a model. Suites:
kernels (bench_kernels.py's providers), masks (bench_masks.py's), data (bench_data.py's) and step
(suite_step.py: the engine's training step vs the reference step). Exit status 1 when a provider
disagreed with its reference (its row says FAILED; no ratio is reported for it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import report as R  # noqa: E402

SUITES = ("kernels", "masks", "data", "step")
H100_BF16_DENSE = 989e12  # FLOP/s, the datasheet's dense bf16 tensor-core peak (SXM)
PROJ_MFU = 0.40
PROJ_PRESET = "vit-b-paper"  # projections only for the paper-size model: a demo-size rate says nothing about it
QUICK_MIN_S = 300.0  # a quick run's demo configurations get at least this (they take seconds): load slows them, never drops them
METHOD = ("Timing: warm-up calls, then repetitions on fresh random inputs; CPU: time.perf_counter (monotonic), "
          "GPU: CUDA events. Every provider is checked against its reference before it is timed. Peak memory: "
          "CPU = resident-set high-water mark of one call above the resident set before it (glibc free pages "
          "returned with malloc_trim, kernel peak reset via /proc/self/clear_refs); GPU = "
          "torch.cuda.max_memory_allocated above the allocation before the call. Step peak = model + optimizer "
          "state bytes + that per-step peak.")


# ----------------------------------------------------------------------------- step suite orchestration
def _step_plan(device, quick):
    """(preset, precision, share of the step budget, max batch, reps, warm-up, profile)."""
    if quick:
        return [("demo", "fp32", 1, 4, 2, 1, True), ("demo", "bf16", 1, 4, 2, 1, False)]
    if device.type == "cuda":
        return [(p, pr, 1, b, 10, 3, p == "vit-s" and pr == "bf16") for p, b in (("demo", 32), ("vit-s", 64),
                                                                                 ("vit-b-paper", 64))
                for pr in ("bf16", "fp32")]
    # CPU: vit-s is the goal configuration; batch capped at 16 (the preset's 64 cannot fit 15 minutes).
    return [("demo", "fp32", 1, 32, 5, 1, False), ("demo", "bf16", 1, 32, 5, 1, False),
            ("vit-s", "bf16", 3, 16, 3, 1, True), ("vit-s", "fp32", 3, 16, 3, 1, True),
            ("vit-b-paper", "fp32", 1, 16, 3, 1, False), ("vit-b-paper", "bf16", 1, 16, 3, 1, False)]


def _step_rows(res, peaks) -> list[dict]:
    preset, prec = res["preset"], res["precision"]
    what = f"train step {preset}"
    if "skipped" in res:
        shape = "-"
        return [R.row("step", what, shape, prec, p, is_baseline=b, note=res["skipped"], preset=preset)
                for p, b in (("engine", False), ("reference", True))]
    N = res["batch"]
    shape = f"batch {N}"
    rows = []
    for prov, is_base in (("engine", False), ("reference", True)):
        ph = res["phases"][prov]
        st = H.summarize([p["total"] for p in ph])
        med = {k: statistics.median(p[k] for p in ph) for k in ("data", "forward", "backward", "optimizer_ema")}
        flops = res["flops_engine" if prov == "engine" else "flops_reference"]["total"]
        mem = res["memory"][prov]
        step_b = mem["step_bytes"]
        peak = None if step_b is None else mem["state_bytes"] + step_b
        achieved = flops / (st["median_ms"] / 1e3)
        rows.append(R.row("step", what, shape, prec, prov, is_baseline=is_base, stats=st, peak_bytes=peak,
                          preset=preset, batch=N, phases_ms=med, images_per_s=N / (st["median_ms"] / 1e3),
                          gflop_per_step=flops / 1e9, achieved_tflops=achieved / 1e12,
                          mfu=achieved / peaks[prec]["flops"] if prec in peaks else None,
                          state_mib=mem["state_bytes"] / 2**20, step_mib=(step_b or 0) / 2**20))
    return rows


def run_step(device, quick, budget_s, out_dir, peaks, batch, threads, only=()) -> tuple[list, list, str, list]:
    """Rows, goals, notes and projection rows of the step suite, each configuration in a child process;
    `only`: (preset, precision) pairs to keep (--step-configs)."""
    plan = [p for p in _step_plan(device, quick) if not only or (p[0], p[1]) in only]
    t0, rows, results, notes = time.perf_counter(), [], [], []
    for i, (preset, prec, share, max_b, reps, warm, prof) in enumerate(plan):
        left = budget_s - (time.perf_counter() - t0)
        my = left * share / sum(p[2] for p in plan[i:])
        if quick:
            my = max(my, QUICK_MIN_S)
        if prec not in peaks:
            res = {"preset": preset, "precision": prec, "skipped": f"not measured: no {prec} on {device.type}"}
        else:
            spec = dict(preset=preset, precision=prec, device=str(device), budget_s=my, max_batch=max_b,
                        batch=batch or (4 if quick else 0), reps=reps, warmup=warm, profile=prof,
                        peak_flops=peaks[prec]["flops"], threads=threads)
            res = __import__("suite_step").run_child(spec, os.path.join(out_dir, "step_tmp"), my * 2 + 180)
        results.append(res)
        if res.get("matmul_peak") and res["matmul_peak"]["flops"] > peaks[prec]["flops"]:
            peaks[prec].update(flops=res["matmul_peak"]["flops"], tflops=res["matmul_peak"]["tflops"],
                               best_from=f"step child {preset} {prec}")
    for res in results:  # after every measurement of the peak (see above)
        rows += _step_rows(res, peaks)
        if "check" in res:
            c, ft = res["check"], res.get("flops_teacher")
            share = f"; the teacher's passes are {ft / res['flops_engine']['total']:.0%} of its FLOPs" if ft else ""
            notes.append(f"- {res['preset']} {res['precision']}: batch {res['batch']} ({res['batch_reason']}); loss check passed "
                         f"(engine {c['engine_loss']:.6g}, reference {c['reference_loss']:.6g}; {c['rule']}){share}; "
                         f"child wall {res.get('wall_s', 0):.0f} s.")
    if quick:
        for preset in ("vit-s", "vit-b-paper"):
            rows += [R.row("step", f"train step {preset}", "-", "bf16", p, is_baseline=b, preset=preset,
                           note="not measured: --quick measures the demo preset only") for p, b in
                     (("engine", False), ("reference", True))]
    prof = [f"== {r['preset']} {r['precision']} batch {r['batch']}: engine step, torch.profiler top operators ==\n"
            f"{r['profile']}" for r in results if r.get("profile")]
    if prof:
        with open(os.path.join(out_dir, "profile_step.txt"), "w") as f:
            f.write("\n\n".join(prof) + "\n")
    R.add_ratios(rows)
    over = sorted({f"{r['extra']['preset']} {r['dtype']}" for r in rows if (r["extra"].get("mfu") or 0) > 1})
    if over:
        notes.append(f"- MFU above 100% ({', '.join(over)}): that precision's square-matmul peak is no ceiling for "
                     "this step here (e.g. bf16 emulated on a CPU without AMX/AVX512-BF16, while part of an autocast "
                     "step runs in fp32 or in small, faster kernels); read the fp32 rows' MFU instead.")
    proj_u = projections(results)
    if not proj_u:
        notes.append(f"- No H100 projection: projections are made for the paper-size model ({PROJ_PRESET}) only, "
                     "and this run did not count its FLOPs.")
    text = ("Step suite: engine = mcf_fast.train.step.TrainStep, the step loop.train runs (fused AdamW, foreach EMA "
            "and grad norm, device-side skip); reference = mcf_fast.model.reference with MAE's loop (torch.rand "
            "noise, Python-loop EMA, loss.item() per step, per-tensor grad-norm loop, torch.optim.AdamW defaults: "
            "foreach=None, fused=None, i.e. the single-tensor for-loop on CPU and foreach on CUDA). Teacher: "
            "random ViT-B/16 at 224 for vit-s / vit-b-paper (the paper's size). Data: the synthetic-face loader, "
            "workers=0, same for both; 'data' includes the masks (engine) or noise (reference). FLOPs: "
            "torch.utils.flop_counter on fake tensors, the CPU flash-attention op added with torch's SDPA formulas. "
            "MFU = counted FLOPs of that provider's step / median step time / the matmul peak measured in this run.\n"
            + "\n".join(notes))
    return rows, _goals(rows, device), text, proj_u


def projections(results) -> list[dict]:
    """H100 rows for the paper-size preset only, from its counted FLOPs at PROJ_MFU of the bf16 peak:
    a model, labelled as one (fp32 and bf16 count the same FLOPs, so one row)."""
    for r in results:
        f = r.get("flops_per_image_engine")
        if f and r["preset"] == PROJ_PRESET:
            ips = PROJ_MFU * H100_BF16_DENSE / f
            return [R.row("projection", f"H100 {r['preset']} bf16 (model)", "per GPU", "bf16", "engine (model)",
                          note=f"model, not measured: {f / 1e9:.1f} counted GFLOP per image (fwd+bwd) at "
                               f"{PROJ_MFU:.0%} of 989 TFLOP/s", images_per_s=ips, hours_per_epoch=20e6 / ips / 3600)]
    return []


def _goals(rows, device) -> list[dict]:
    """The issue's CPU goals at vit-s, bf16, equal batch."""
    get = {(r["extra"].get("preset"), r["dtype"], r["provider"]): r for r in rows if r["suite"] == "step"}
    e, b = get.get(("vit-s", "bf16", "engine")), get.get(("vit-s", "bf16", "reference"))
    goals = [("engine images/s vs reference (vit-s, bf16, equal batch)", ">= 1.5x", "speedup", lambda v: v >= 1.5,
              "{:.2f}x"),
             ("engine peak memory vs reference", "<= 0.6x", "mem_ratio", lambda v: v <= 0.6, "{:.2f}x"),
             ("engine MFU vs measured bf16 matmul peak", ">= 40%", "mfu", lambda v: v >= 0.4, "{:.1%}")]
    out = []
    for name, target, key, ok, fmt in goals:
        v = None if e is None else (e["extra"].get(key) if key == "mfu" else e.get(key))
        if v is None:
            why = (e or b or {}).get("note") or "not measured"
            out.append({"goal": name, "target": target, "measured": why, "met": "not evaluated"})
        else:
            out.append({"goal": name, "target": target, "measured": fmt.format(v), "met": "yes" if ok(v) else "NO"})
    f = get.get(("vit-s", "fp32", "engine"))
    if f is not None and f.get("speedup"):
        out.append({"goal": "(for reference) same at vit-s fp32", "target": "-", "measured":
                    f"speed-up {f['speedup']:.2f}x, memory {R._f(f['mem_ratio'], '{:.2f}x')}, MFU "
                    f"{R._f(f['extra'].get('mfu'), '{:.1%}')}", "met": "-"})
    return out


# ----------------------------------------------------------------------------- main
def _suites(arg: str) -> list[str]:
    names = [s.strip() for s in arg.split(",") if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise SystemExit(f"error: --suite {arg!r}: choose from {', '.join(SUITES)} or all (comma-separated)")
    return [s for s in SUITES if s in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", help="kernels, masks, data, step or all (comma-separated list allowed)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="bench_out", help="report folder (created)")
    ap.add_argument("--quick", action="store_true", help="small shapes, demo preset only (CI smoke run)")
    ap.add_argument("--compare", default="", help="an earlier report.json: print the change per row")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock budget of the whole run (default 780 s, --quick 100 s); the step suite "
                         "fits its batch and configurations into what the other suites leave")
    ap.add_argument("--step-batch", type=int, default=0, help="fix the step suite's batch (0 = largest that fits)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--step-configs", default="", help="step suite: only these PRESET:PRECISION pairs, comma-"
                    "separated (e.g. vit-s:bf16,vit-b-paper:bf16; default: the device's whole plan)")
    a = ap.parse_args(argv)
    only = tuple(tuple(c.split(":", 1)) for c in a.step_configs.split(",") if c)
    known = {(p[0], p[1]) for q in (False, True) for d in ("cpu", "cuda") for p in _step_plan(torch.device(d), q)}
    if any(c not in known for c in only):
        raise SystemExit(f"error: --step-configs {a.step_configs!r}: give PRESET:PRECISION pairs from "
                         f"{', '.join(sorted(f'{p}:{q}' for p, q in known))}")
    suites = _suites(a.suite)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device: use --device cpu")
    if a.compare and not os.path.exists(a.compare):
        raise SystemExit(f"error: --compare {a.compare}: no such file (pass an earlier DIR/report.json)")
    if a.step_batch == 1 or a.step_batch < 0 or a.budget_s < 0:
        raise SystemExit("error: --step-batch must be 0 (choose) or >= 2 (the heads' BatchNorm needs 2 samples), "
                         "--budget-s >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    budget = a.budget_s or (100.0 if a.quick else 780.0)  # 15 minutes minus margin for overshoot
    t0 = time.perf_counter()
    others = H.OtherLoad()
    machine = H.machine_info(device)
    rows, goals, notes, failed = [], [], "", []
    peaks = {}
    if "step" in suites:  # the MFU denominators, measured now, on this machine, under this load
        dts = ("fp32", "bf16") + (("fp16",) if device.type == "cuda" else ())
        for name in dts:
            peaks[name] = H.matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[name]),
                                        device, budget_s=3.0 if a.quick else 8.0)
        machine["matmul_peak"] = peaks
    import suites as S
    for s in suites:
        ts = time.perf_counter()
        try:
            if s == "step":
                left = budget - (time.perf_counter() - t0) - 20
                srows, goals, notes, proj = run_step(device, a.quick, max(left, 30.0), a.out, peaks, a.step_batch,
                                                     a.threads, only)
                rows += srows + proj
                failed += [r for r in srows if r["note"].startswith("FAILED")]
            else:
                rows += getattr(S, s)(device, a.quick)
        except H.ProviderMismatch as e:
            failed.append(s)
            rows.append(R.row(s, "provider check", "-", "-", "-", note=f"FAILED: {e}"))
        except Exception as e:  # a broken suite must not hide the others' results; the exit status says it
            failed.append(s)
            traceback.print_exc()
            rows.append(R.row(s, "suite crashed", "-", "-", "-", note=f"FAILED: {type(e).__name__}: {e}"))
        print(f"[run.py] suite {s}: {time.perf_counter() - ts:.0f} s", file=sys.stderr, flush=True)
    R.add_ratios(rows)
    share = others.share()
    machine.update(loadavg_end=round(os.getloadavg()[0], 2), wall_s=round(time.perf_counter() - t0, 1),
                   other_processes_cpu=None if share is None else round(share, 3))
    rep = {"suites": suites, "device": a.device, "quick": a.quick, "machine": machine, "rows": rows,
           "goals": goals, "step_notes": notes, "method": METHOD}
    R.write(a.out, rep)
    if a.compare:
        with open(a.compare) as f:
            print(R.compare(rep, json.load(f)) + "\n")
    print(R.to_markdown(rep))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
