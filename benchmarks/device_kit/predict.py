"""The cost sheet beside the measurement, so that the first GPU run calibrates it.

The kit's `plan` step runs `mcf_fast.plan`'s sheet (`plan_sheet`) for exactly what the later steps
measure (runs.py: the pretrain command line, the step suite's configurations at their pinned batch), on
the GPU the kit is on, world size 1 (every kit run is one process). It runs in the kit's own process,
on the CPU, before any measurement: the real training step traced on fake tensors, a few seconds.
`compare` then sets each prediction beside its measurement: images/s per GPU, MFU (both as shares of
the datasheet peak the sheet uses) and peak allocated memory.

The GPU: the CUDA device's name picks the sheet's machine (its peaks and MFU range; an unknown name is
planned as an H100) and its reported memory is the capacity. Without CUDA, `--plan-gpu` (default h200,
the machine the kit is written for) at its datasheet memory, so a CPU run already shows the columns.
"""
from __future__ import annotations

import time

from .runs import STEP_CONFIGS, pretrain_args, step_config

DEFAULT_GPU = "h200"
GPU_CHOICES = ("auto", "h100", "h200", "a100")
NO_PLAN = "no prediction: the plan step did not run"


def gpu_for(choice: str = "auto") -> dict:
    """{'kind', 'memory_bytes' (None: the datasheet's), 'why'}: the machine the sheet plans for."""
    import torch

    from mcf_fast.plan.check import gpu_kind
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory
        kind = gpu_kind(name) if choice == "auto" else choice
        how = "given by --plan-gpu" if choice != "auto" else "named by the device" if kind in name.lower() else \
            "at the H100's speed: the sheet knows no GPU of this name"
        return {"kind": kind, "memory_bytes": mem, "device": name,
                "why": f"this GPU ({name}): {kind} {how}, {mem / 2**30:.1f} GiB as the device reports"}
    kind = DEFAULT_GPU if choice == "auto" else choice
    how = "the machine the kit is written for" if choice == "auto" else "given by --plan-gpu"
    return {"kind": kind, "memory_bytes": None, "device": None,
            "why": f"no CUDA device here: {kind} ({how}) at its datasheet memory"}


def kit_configs() -> list[dict]:
    """(key, step, config) of every run the kit measures. The pretrain run's config comes from its own
    command line through the plan's parser (pretrain's options, without its device and file checks: the
    plan is made where the run is not); its checkpoint teacher (a random-weights ViT-B/16 the kit writes
    later) is planned as the 'random' teacher of the same architecture (the --model.teacher_* fields)."""
    from mcf_fast.plan.cli import parse
    try:
        cfg = parse(pretrain_args("random", "kit-pretrain-run"))[0]
    except SystemExit as e:  # the parser's one-line refusal is on stderr; the kit must go on
        raise ValueError(f"the plan's parser refused the kit's pretrain command line (exit {e.code})") from None
    out = [{"key": "pretrain", "step": "pretrain", "cfg": cfg}]
    for preset, precision in STEP_CONFIGS:
        out.append({"key": f"step {preset} {precision}", "step": "bench_step", "preset": preset,
                    "precision": precision, "cfg": step_config(preset, precision)})
    return out


def predict(gpu: dict) -> list[dict]:
    """The sheet's numbers for each kit run on `gpu` (from gpu_for)."""
    from mcf_fast.plan.sheet import Target, plan_sheet
    rows = []
    for c in kit_configs():
        s = plan_sheet(c["cfg"], Target(gpu=gpu["kind"], gpus=1, memory_bytes=gpu["memory_bytes"]),
                       with_fixes=False, with_loader=False)
        r, rng, mem = s["run"], s["speed"]["range"], s["memory"]
        rows.append({"key": c["key"], "step": c["step"], "preset": r["preset"], "precision": r["precision"],
                     "batch": r["batch"], "accum_steps": r["accum_steps"], "world": r["world"], "machine": r["machine"],
                     "label": f"{c['key']} (batch {r['batch']} x accum {r['accum_steps']})",
                     "flops_per_image": s["flops"]["per_image"], "peak_flops": s["speed"]["peak_flops"],
                     "images_per_s": {k: v["images_per_s_per_gpu"] for k, v in rng.items()},
                     "mfu": {k: v["mfu"] for k, v in rng.items()},
                     "memory_allocated": mem["allocated"], "memory_needed": mem["needed"],
                     "memory_capacity": mem["capacity"], "fits": mem["fits"], "notes": s["trace"]["notes"]})
    return rows


def plan_step(ctx, deadline: float) -> dict:
    """The kit step: the predictions, in this process (a trace of seconds: nothing to time-box)."""
    return make_plan(ctx.plan_gpu)


def make_plan(gpu_choice: str) -> dict:
    """The plan step's result: status, summary, the GPU planned for, the predictions, seconds taken."""
    t0 = time.perf_counter()
    gpu = gpu_for(gpu_choice)
    preds = predict(gpu)
    each = "; ".join(f"{p['key']}: {p['images_per_s']['likely']:,.0f} img/s, {p['memory_allocated'] / 2**30:.1f} GiB"
                     + ("" if p["fits"] else " (DOES NOT FIT)") for p in preds)
    return {"status": "passed", "gpu": gpu, "predictions": preds, "plan_s": round(time.perf_counter() - t0, 1),
            "summary": f"{preds[0]['machine']} x 1 ({gpu['why']}): {each}"}


def predicted_flops_per_image(results: dict, key: str) -> float | None:
    """The plan step's counted FLOPs per image of kit run `key`, when it ran."""
    preds = (results.get("plan") or {}).get("predictions") or []
    return next((p["flops_per_image"] for p in preds if p["key"] == key), None)


def _step_row(res: dict, p: dict) -> dict | None:
    return next((r for r in res.get("rows") or [] if r.get("suite") == "step" and r.get("provider") == "engine"
                 and r.get("extra", {}).get("preset") == p["preset"] and r.get("dtype") == p["precision"]), None)


def measured(p: dict, results: dict, missing: str) -> tuple[dict | None, str]:
    """(what the kit measured for prediction `p`, or None; why not / what to know about it)."""
    res = results.get(p["step"])
    if res is None:
        return None, missing
    if p["step"] == "pretrain":
        if res.get("images_per_s") is None:
            return None, res["summary"] if res["status"] == "skipped" else f"{res['status']}: no metrics"
        return {"images_per_s": res["images_per_s"], "mfu_of_measured_peak": res.get("mfu"),
                "peak_bytes": res["peak_mem_mb"] * 2**20, "batch": p["batch"]}, "max_memory_allocated of the run"
    row = _step_row(res, p)
    if row is None or row.get("median_ms") is None:
        return None, (row or {}).get("note") or res.get("summary", "")
    ex = row["extra"]
    peak = None if row.get("peak_mib") is None else row["peak_mib"] * 2**20
    why = "state + step peak allocated" if ex.get("batch") == p["batch"] else \
        f"MEASURED AT BATCH {ex.get('batch')}, predicted at {p['batch']}"
    return {"images_per_s": ex["images_per_s"], "mfu_of_measured_peak": ex.get("mfu"), "peak_bytes": peak,
            "batch": ex.get("batch")}, why


def compare(results: dict, missing: str = "not run") -> list[dict]:
    """One row per (kit run, quantity): predicted (likely, with the low-high range), measured, their ratio."""
    preds = (results.get("plan") or {}).get("predictions")
    if not preds:
        return []
    rows = []
    for p in preds:
        m, why = measured(p, results, missing)
        ips = m["images_per_s"] if m else None
        mfu = ips * p["flops_per_image"] / p["peak_flops"] if m else None
        own = m.get("mfu_of_measured_peak") if m else None
        rows += [_row(p, "images/s per GPU", "rate", p["images_per_s"], ips, why if not m else ""),
                 _row(p, f"MFU of {p['peak_flops'] / 1e12:.0f} TFLOP/s", "share", p["mfu"], mfu,
                      why if not m else f"{own:.1%} of the bf16 matmul peak measured here" if own else ""),
                 _row(p, "peak memory allocated", "bytes", {"likely": p["memory_allocated"]},
                      m["peak_bytes"] if m else None, why)]
    return rows


def _row(p, quantity, unit, pred: dict, meas, note) -> dict:
    likely = pred["likely"]
    return {"run": p["label"], "quantity": quantity, "unit": unit, "predicted": likely, "low": pred.get("low"),
            "high": pred.get("high"), "measured": meas, "ratio": meas / likely if meas is not None else None,
            "in_range": (pred["low"] <= meas <= pred["high"]) if meas is not None and "low" in pred else None,
            "note": note, "needed": p["memory_needed"] if unit == "bytes" else None,
            "capacity": p["memory_capacity"] if unit == "bytes" else None}


def step_cell(step: str, results: dict) -> str:
    """The step table's 'predicted' cell: the sheet's likely numbers for the runs that step measures."""
    preds = [p for p in (results.get("plan") or {}).get("predictions") or [] if p["step"] == step]
    return "; ".join(f"{p['key']}: {p['images_per_s']['likely']:,.0f} img/s, MFU {p['mfu']['likely']:.0%}, "
                     f"{p['memory_allocated'] / 2**30:.2f} GiB" for p in preds) or "-"


__all__ = ["gpu_for", "kit_configs", "predict", "plan_step", "make_plan", "compare", "measured", "step_cell",
           "predicted_flops_per_image", "DEFAULT_GPU", "GPU_CHOICES", "NO_PLAN"]
