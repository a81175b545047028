"""The `step` suite: the engine's training step vs the reference step (mcf_fast.model.reference with MAE's
loop), per (preset, precision), each configuration measured in a child process (`step_child`).

The suite measures the MFU denominators first (square-matmul peaks, here and now), then gives each
configuration its share of the budget: a child gets a wall-clock deadline, chooses the largest batch
whose predicted cost fits it, and is stopped at that deadline (its row then says so). The children's
files live in a temporary folder that is removed afterwards, also on error or Ctrl-C. H100 projections
are made for the paper-size preset only and labelled as a model.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch

from mcf_fast.plan.hardware import H100

from . import harness as H
from .budget import Budget
from .machine import matmul_peak
from .rows import add_ratios, row, unmeasured
from .tables import fmt

PROJ_PRESET = "vit-b-paper"  # projections only for the paper-size model: a demo-size rate says nothing about it
CHILD_MIN_S = 20.0  # below this, a configuration is not started: a child imports torch and builds two models
GRACE_S = 10.0      # the child aims to end this long before it is stopped
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = (("engine", False), ("reference", True))
BASELINES = ("step: the baseline is mcf_fast.model.reference.ref_losses / ref_ema with MAE's loop (see the step notes).")


def plan(device: torch.device, quick: bool) -> list[tuple]:
    """(preset, precision, share of the step budget, max batch, reps, warm-up, profile) per configuration."""
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


def known_configs() -> set[tuple[str, str]]:
    """Every (preset, precision) any plan measures: what --step-configs accepts."""
    return {(p[0], p[1]) for q in (False, True) for d in ("cpu", "cuda") for p in plan(torch.device(d), q)}


def launch(spec: dict, tmpdir: str, timeout_s: float) -> dict:
    """Run `step_child.main(spec)` in a fresh (spawned) process; stopped at `timeout_s`. A crash, a kill or
    a time-out becomes the configuration's 'skipped' reason."""
    from . import step_child
    tag = f"{spec['preset']}_{spec['precision']}"
    path = os.path.join(tmpdir, f"result_{tag}.json")
    # daemon: a Ctrl-C or crash of this process takes the child with it
    p = mp.get_context("spawn").Process(target=step_child.main, args=(spec, path), name=f"step {tag}", daemon=True)
    p.start()
    p.join(timeout_s)
    base = {"preset": spec["preset"], "precision": spec["precision"]}
    if p.is_alive():
        p.kill()
        p.join()
        return dict(base, skipped=f"not measured: stopped at the end of its {timeout_s:.0f} s share of the budget")
    if not os.path.exists(path):
        how = f"was killed by signal {-p.exitcode}" if (p.exitcode or 0) < 0 else f"exited with status {p.exitcode}"
        return dict(base, failed=True, skipped=f"FAILED: the child process {how} before writing its result")
    with open(path) as f:
        return json.load(f)


def peaks(device: torch.device, quick: bool, budget: Budget) -> dict:
    """The MFU denominators, measured now, on this machine, under this load (a small part of the budget)."""
    names = ("fp32", "bf16") + (("fp16",) if device.type == "cuda" else ())
    each = min(3.0 if quick else 8.0, max(budget.left(), 0) * 0.05)
    return {n: matmul_peak(DTYPES[n], device, budget_s=each) for n in names} if each >= 0.5 else {}


def run(device: torch.device, quick: bool, budget: Budget, *, batch: int = 0, threads: int = 0, only=(),
        launcher=launch) -> dict:
    """{'rows', 'goals', 'notes', 'peaks'} of the step suite; `only`: the (preset, precision) pairs to keep."""
    todo = [p for p in plan(device, quick) if not only or (p[0], p[1]) in only]
    pk = peaks(device, quick, budget)
    results = []
    with tempfile.TemporaryDirectory(prefix="mcf_bench_step_") as tmp:
        for i, (preset, prec, share, max_b, reps, warm, prof) in enumerate(todo):
            part = budget.share(share, sum(p[2] for p in todo[i:]))
            base = {"preset": preset, "precision": prec}
            if prec not in pk:
                why = f"no {prec} on {device.type}" if pk else "the budget left no time to measure the matmul peaks"
                res = dict(base, skipped=budget.skip(f"step {preset} {prec}", why) if not pk else f"not measured: {why}")
            elif part.left() < CHILD_MIN_S:
                res = dict(base, skipped=budget.skip(f"step {preset} {prec}", f"{max(part.left(), 0):.0f} s of the budget "
                                                     f"left for it, under the {CHILD_MIN_S:.0f} s a configuration needs"))
            else:
                spec = dict(preset=preset, precision=prec, device=str(device), share_s=part.left(),
                            deadline=time.time() + part.left() - GRACE_S,
                            max_batch=max_b, batch=batch or (4 if quick else 0), reps=reps, warmup=warm, profile=prof,
                            peak_flops=pk[prec]["flops"], threads=threads)
                res = launcher(spec, tmp, part.left())
                if res.get("skipped") and not res.get("failed"):  # the child's reasons are all the budget's
                    budget.skip(f"step {preset} {prec}", res["skipped"].removeprefix("not measured: "))
            results.append(res)
            mp_ = res.get("matmul_peak")
            if mp_ and prec in pk and mp_["flops"] > pk[prec]["flops"]:
                pk[prec].update(flops=mp_["flops"], tflops=mp_["tflops"], best_from=f"step child {preset} {prec}")
    rows = [r for res in results for r in _rows(res, pk)]  # after every measurement of the peak (see above)
    if quick:
        for preset in ("vit-s", "vit-b-paper"):
            rows += unmeasured("step", f"train step {preset}", "-", "bf16", PROVIDERS, preset=preset,
                               note="not measured: --quick measures the demo preset only")
    add_ratios(rows)
    proj = projections(results)
    return {"rows": rows + proj, "goals": goals(rows), "notes": notes(results, rows, proj), "peaks": pk,
            "profile": [f"== {r['preset']} {r['precision']} batch {r['batch']}: engine step, torch.profiler top "
                        f"operators ==\n{r['profile']}" for r in results if r.get("profile")]}


def _rows(res: dict, peaks: dict) -> list[dict]:
    preset, prec = res["preset"], res["precision"]
    what = f"train step {preset}"
    if "skipped" in res:
        return unmeasured("step", what, "-", prec, PROVIDERS, note=res["skipped"], preset=preset)
    N, rows = res["batch"], []
    for prov, is_base in PROVIDERS:
        ph = res["phases"][prov]
        st = H.summarize([p["total"] for p in ph])
        med = {k: statistics.median(p[k] for p in ph) for k in ("data", "forward", "backward", "optimizer_ema")}
        flops = res["flops_engine" if prov == "engine" else "flops_reference"]["total"]
        mem = res["memory"][prov]
        step_b = mem["step_bytes"]
        achieved = flops / (st["median_ms"] / 1e3)
        rows.append(row("step", what, f"batch {N}", prec, prov, is_baseline=is_base, stats=st,
                        peak_bytes=None if step_b is None else mem["state_bytes"] + step_b, preset=preset, batch=N,
                        phases_ms=med, images_per_s=N / (st["median_ms"] / 1e3), gflop_per_step=flops / 1e9,
                        achieved_tflops=achieved / 1e12, mfu=achieved / peaks[prec]["flops"] if prec in peaks else None,
                        state_mib=mem["state_bytes"] / 2**20, step_mib=(step_b or 0) / 2**20))
    return rows


def projections(results) -> list[dict]:
    """H100 rows for the paper-size preset only, from its counted FLOPs at the cost sheet's MFU range
    (mcf_fast.plan.hardware, the same assumptions `python -m mcf_fast.plan` states): a model, labelled as
    one (fp32 and bf16 count the same FLOPs, so one row, at the likely MFU)."""
    mfu = {k: v[0] for k, v in H100.mfu_range().items()}
    peak = H100.peak["bf16"]
    for r in results:
        f = r.get("flops_per_image_engine")
        if f and r["preset"] == PROJ_PRESET:
            ips = mfu["likely"] * peak / f
            return [row("projection", f"H100 {r['preset']} bf16 (model)", "per GPU", "bf16", "engine (model)",
                        note=f"model, not measured: {f / 1e9:.1f} counted GFLOP per image (fwd+bwd) at the cost "
                             f"sheet's likely {mfu['likely']:.0%} MFU ({mfu['low']:.0%}-{mfu['high']:.0%}: "
                             f"{mfu['low'] * peak / f:.0f}-{mfu['high'] * peak / f:.0f} images/s) of "
                             f"{peak / 1e12:.0f} TFLOP/s; `python -m mcf_fast.plan` for the whole sheet",
                        images_per_s=ips, hours_per_epoch=20e6 / ips / 3600)]
    return []


def goals(rows) -> list[dict]:
    """The CPU goals at vit-s, bf16, equal batch."""
    get = {(r["extra"].get("preset"), r["dtype"], r["provider"]): r for r in rows if r["suite"] == "step"}
    e, b = get.get(("vit-s", "bf16", "engine")), get.get(("vit-s", "bf16", "reference"))
    targets = [("engine images/s vs reference (vit-s, bf16, equal batch)", ">= 1.5x", "speedup", lambda v: v >= 1.5,
                "{:.2f}x"),
               ("engine peak memory vs reference", "<= 0.6x", "mem_ratio", lambda v: v <= 0.6, "{:.2f}x"),
               ("engine MFU vs measured bf16 matmul peak", ">= 40%", "mfu", lambda v: v >= 0.4, "{:.1%}")]
    out = []
    for name, target, key, ok, spec in targets:
        v = None if e is None else (e["extra"].get(key) if key == "mfu" else e.get(key))
        if v is None:
            out.append({"goal": name, "target": target, "measured": (e or b or {}).get("note") or "not measured",
                        "met": "not evaluated"})
        else:
            out.append({"goal": name, "target": target, "measured": spec.format(v), "met": "yes" if ok(v) else "NO"})
    f = get.get(("vit-s", "fp32", "engine"))
    if f is not None and f.get("speedup"):
        out.append({"goal": "(for reference) same at vit-s fp32", "target": "-", "measured":
                    f"speed-up {f['speedup']:.2f}x, memory {fmt(f['mem_ratio'], '{:.2f}x')}, MFU "
                    f"{fmt(f['extra'].get('mfu'), '{:.1%}')}", "met": "-"})
    return out


def notes(results, rows, proj) -> str:
    """The step section's text: what each provider is, then one line per measured configuration."""
    lines = []
    for res in results:
        if "check" in res:
            c, ft = res["check"], res.get("flops_teacher")
            share = f"; the teacher's passes are {ft / res['flops_engine']['total']:.0%} of its FLOPs" if ft else ""
            lines.append(f"- {res['preset']} {res['precision']}: batch {res['batch']} ({res['batch_reason']}); loss check "
                         f"passed (engine {c['engine_loss']:.6g}, reference {c['reference_loss']:.6g}; {c['rule']})"
                         f"{share}; child wall {res.get('wall_s', 0):.0f} s.")
    over = sorted({f"{r['extra']['preset']} {r['dtype']}" for r in rows if (r["extra"].get("mfu") or 0) > 1})
    if over:
        lines.append(f"- MFU above 100% ({', '.join(over)}): that precision's square-matmul peak is no ceiling for "
                     "this step here (e.g. bf16 emulated on a CPU without AMX/AVX512-BF16, while part of an autocast "
                     "step runs in fp32 or in small, faster kernels); read the fp32 rows' MFU instead.")
    if not proj:
        lines.append(f"- No H100 projection: projections are made for the paper-size model ({PROJ_PRESET}) only, "
                     "and this run did not count its FLOPs.")
    return ("Step suite: engine = mcf_fast.train.step.TrainStep, the step loop.train runs (fused AdamW, foreach EMA "
            "and grad norm, device-side skip); reference = mcf_fast.model.reference with MAE's loop (torch.rand "
            "noise, Python-loop EMA, loss.item() per step, per-tensor grad-norm loop, torch.optim.AdamW defaults: "
            "foreach=None, fused=None, i.e. the single-tensor for-loop on CPU and foreach on CUDA). Teacher: "
            "random ViT-B/16 at 224 for vit-s / vit-b-paper (the paper's size). Data: the synthetic-face loader, "
            "workers=0, same for both; 'data' includes the masks (engine) or noise (reference). FLOPs: "
            "torch.utils.flop_counter on fake tensors, the CPU flash-attention op added with torch's SDPA formulas. "
            "MFU = counted FLOPs of that provider's step / median step time / the matmul peak measured in this run.\n"
            + "\n".join(lines))


__all__ = ["BASELINES", "plan", "known_configs", "launch", "peaks", "run", "projections", "goals", "notes"]
