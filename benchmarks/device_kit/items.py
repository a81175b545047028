"""The device check's steps, in the order they run. Each returns dict(status, summary, ...data)."""
import glob
import json
import os
import re
import statistics
import time
import xml.etree.ElementTree as ET

from . import prep
from .predict import plan_step, predicted_flops_per_image
from .runner import Context, Step, run_cmd
from .runs import pretrain_args, step_suite_args


def _status(rc):
    return "passed" if rc == 0 else ("timeout" if rc is None else "failed")


def _tail(out: str, n: int = 3) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:]


def install(ctx: Context, deadline: float) -> dict:
    """The wheels carried in gpu_wheels/ into a private folder on PYTHONPATH: no network, no deps."""
    whls = sorted(glob.glob(os.path.join(prep.WHEELS, "*.whl")))
    if not whls:
        return {"status": "skipped",
                "summary": "skipped: no gpu_wheels/*.whl (run --prep where pip works and copy gpu_wheels/ here)"}
    site = ctx.env["MCF_KIT_SITE"]
    rc, out = run_cmd(ctx, "install", [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                       "--no-compile", "--disable-pip-version-check", "--upgrade", "--target", site]
                      + whls, deadline)
    names = ", ".join(os.path.basename(w).split("-")[0] for w in whls)
    return {"status": _status(rc), "summary": f"{names} into {site}" if rc == 0 else _tail(out)}


def build(ctx: Context, deadline: float) -> dict:
    """README's install, offline: pip builds mcf_fast._C in place with its CUDA part for sm_90 required."""
    env = dict(ctx.env, MCF_FAST_BUILD_CUDA="1", MCF_FAST_CUDA_ARCH="90")
    rc, out = run_cmd(ctx, "build", [ctx.python, "-m", "pip", "install", "-v", "--no-index", "--no-deps",
                                     "--no-build-isolation", "--disable-pip-version-check", "-e", "."],
                      deadline, env=env)
    ptxas = [ln.strip() for ln in out.splitlines() if re.search(r"ptxas info\s*: Used|bytes stack frame", ln)]
    res = {"ptxas": ptxas, "setup_lines": [ln.strip() for ln in out.splitlines() if "[mcf_fast setup]" in ln]}
    if rc != 0:
        # Still install the package without _C, so that mcf_fast.kernels resolves (kernels/ is mapped by
        # the install) and the Triton steps run; the CUDA mask test then fails, as it should.
        run_cmd(ctx, "install without _C", [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                            "--no-build-isolation", "-e", "."], deadline,
                env=dict(ctx.env, MCF_FAST_BUILD_EXT="0"))
        return dict(res, status=_status(rc), summary=_tail(out))
    rc2, out2 = run_cmd(ctx, "import _C", [ctx.python, "-c", "import mcf_fast._C as c; print('WITH_CUDA', c.WITH_CUDA)"],
                        deadline)
    ok = rc2 == 0 and "WITH_CUDA 1" in out2
    spills = [ln for ln in ptxas if re.search(r"[1-9]\d* bytes spill", ln)]
    summary = (f"_C imports with CUDA; ptxas: {'; '.join(ptxas) or 'no report'}" if ok else
               f"_C did not import with its CUDA part: {_tail(out2)}")
    return dict(res, status="passed" if ok and not spills else "failed", summary=summary + (
        f"; SPILLS: {spills}" if spills else ""))


def parse_junit(path: str) -> dict:
    """Counts and failing test ids from a pytest --junitxml file."""
    counts, failed = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}, []
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            key = "failed" if case.find("failure") is not None else "errors"
            counts[key] += 1
            failed.append(tid)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts, failed_ids=failed)


def gpu_tests(ctx: Context, deadline: float) -> dict:
    """Every GPU-marked test: Triton kernels vs references (fwd/bwd, fp32/bf16), CUDA masks == CPU masks."""
    xml = os.path.join(ctx.work, "gpu_tests.xml")
    rc, out = run_cmd(ctx, "gpu tests", [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-rfE", "-p",
                                         "no:cacheprovider", "--continue-on-collection-errors",
                                         f"--junitxml={xml}", "tests"], deadline)
    if not os.path.exists(xml):
        return {"status": _status(rc) if rc else "failed", "summary": _tail(out)}
    c = parse_junit(xml)
    ok = rc == 0 and c["failed"] == 0 and c["errors"] == 0 and c["passed"] > 0
    summary = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
    return dict(c, status="passed" if ok else _status(rc) if rc is None else "failed",
                summary=summary + (f"; failing: {', '.join(c['failed_ids'][:8])}" if c["failed_ids"] else ""))


def _bench(ctx, name, suite, extra, deadline) -> dict:
    out_dir = os.path.join(ctx.work, name)
    budget = max(20.0, deadline - time.monotonic() - 25)
    rc, out = run_cmd(ctx, name, [ctx.python, "-m", "benchmarks.run", "--suite", suite, "--device", "cuda", "--out",
                                  out_dir, "--budget-s", f"{budget:.0f}", *extra], deadline)
    rep = os.path.join(out_dir, "report.json")
    if not os.path.exists(rep):
        return {"status": _status(rc) if rc else "failed", "summary": _tail(out)}
    with open(rep) as f:
        data = json.load(f)
    bad = [r["what"] for r in data["rows"] if str(r.get("note", "")).startswith("FAILED")]
    md = open(os.path.join(out_dir, "report.md")).read() if os.path.exists(os.path.join(out_dir, "report.md")) else ""
    return {"status": "passed" if rc == 0 and not bad else _status(rc) if rc is None else "failed",
            "summary": f"{len(data['rows'])} rows" + (f"; FAILED: {', '.join(bad)}" if bad else "; every provider "
                                                      "matched its reference"),
            "rows": data["rows"], "report_md": md}


def bench_kernels_masks(ctx: Context, deadline: float) -> dict:
    return _bench(ctx, "bench_kernels_masks", "kernels,masks", [], deadline)


def bench_step(ctx: Context, deadline: float) -> dict:
    return _bench(ctx, "bench_step", "step", step_suite_args(), deadline)


def _probe(ctx, name, what, deadline) -> dict | None:
    rc, out = run_cmd(ctx, name, [ctx.python, "-m", "benchmarks.device_kit.probes", what], deadline)
    line = next((ln for ln in out.splitlines() if ln.startswith("PROBE_JSON ")), None)
    return json.loads(line[len("PROBE_JSON "):]) if rc == 0 and line else None


def summarize_metrics(path: str, skip: int = 3) -> dict:
    """images/s per GPU (median), data-wait share and peak memory over the logged steps after `skip`."""
    with open(path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    recs = [r for r in recs if "images_per_s" in r]
    if len(recs) <= skip:
        raise ValueError(f"{path}: {len(recs)} logged steps, need more than the {skip} warm-up steps")
    body = recs[skip:]
    step_s = sum(r["step_time_s"] for r in body)
    return {"steps_used": len(body), "first_step": body[0].get("step"), "images_per_s": statistics.median(
        r["images_per_s"] for r in body), "data_wait_share": sum(r["data_time_s"] for r in body) / step_s,
        "peak_mem_mb": max(r.get("peak_mem_mb") or 0 for r in body), "final_loss": body[-1].get("loss")}


def _flops_per_image(ctx) -> tuple[float | None, str]:
    rows = ctx.results.get("bench_step", {}).get("rows") or []
    for r in rows:
        ex = r.get("extra", {})
        if ex.get("preset") == "vit-b-paper" and r.get("dtype") == "bf16" and ex.get("gflop_per_step") and \
                not r.get("is_baseline") and ex.get("batch"):
            return ex["gflop_per_step"] * 1e9 / ex["batch"], "counted by the step suite (vit-b-paper bf16 engine)"
    fpi = predicted_flops_per_image(ctx.results, "pretrain")
    if fpi:  # the same count (tests pin the two equal), made by the plan step's trace
        return fpi, "counted by the plan step's trace of this pretrain setting"
    return None, "no FLOP count: neither the step suite nor the plan step counted vit-b-paper bf16"


def pretrain(ctx: Context, deadline: float) -> dict:
    """python -m mcf_fast.pretrain --preset vit-b-paper, synthetic faces, bf16, with a random-weights
    ViT-B/16 checkpoint as its teacher; images/s, MFU vs the bf16 peak measured here, memory, data wait."""
    peaks = _probe(ctx, "matmul peak", "peak", min(deadline, time.monotonic() + 40))
    teacher = prep.write_teacher(os.path.join(ctx.work, "teacher_vitb16_RANDOM_WEIGHTS.pth"))
    run_dir = os.path.join(ctx.work, "pretrain")
    rc, out = run_cmd(ctx, "pretrain", [ctx.python, "-m", "mcf_fast.pretrain",
                                        *pretrain_args(f"checkpoint:{teacher}", run_dir)], deadline)
    res = {"teacher": "checkpoint: random-weights ViT-B/16 written by the kit (NOT a pre-trained teacher)",
           "matmul_peak": peaks}
    try:
        m = summarize_metrics(os.path.join(run_dir, "metrics.jsonl"))
    except (OSError, ValueError, KeyError) as e:
        return dict(res, status=_status(rc) if rc else "failed", summary=f"no metrics ({e}): {_tail(out)}")
    fpi, src = _flops_per_image(ctx)
    peak = (peaks or {}).get("bf16", {}).get("flops")
    m["mfu"] = m["images_per_s"] * fpi / peak if fpi and peak else None
    m["mfu_source"] = src if peak else "no bf16 matmul peak measured"
    mfu = f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a"
    return dict(res, **m, status="passed" if rc == 0 else _status(rc),
                summary=(f"{m['images_per_s']:.0f} images/s per GPU, MFU {mfu} (bf16 peak "
                         f"{(peak or 0) / 1e12:.0f} TFLOP/s measured here), peak {m['peak_mem_mb']:.0f} MB, data wait "
                         f"{m['data_wait_share']:.1%}, over {m['steps_used']} steps after 3 warm-up"))


def bandwidth(ctx: Context, deadline: float) -> dict:
    """Bytes moved per second by gather_visible / scatter_to_full, as a share of a device-to-device copy."""
    r = _probe(ctx, "bandwidth", "bandwidth", deadline)
    if r is None:
        return {"status": "failed", "summary": "the probe failed: see logs.txt"}
    parts = [f"{k['op']} {k['dtype']} {k['gb_per_s']:.0f} GB/s = {k['fraction_of_copy']:.0%}" for k in r["kernels"]]
    return dict(r, status="passed", summary=f"copy {r['copy']['gb_per_s']:.0f} GB/s; " + "; ".join(parts))


STEPS = [
    Step("plan", "the cost sheet (mcf_fast.plan) of the pretrain and step runs below, for this GPU, 1 process",
         60, 10, plan_step, needs_cuda=False),
    Step("install", "carried wheels (webdataset, braceexpand, simplejpeg) installed offline", 60, 5, install),
    Step("build", "pip install -e . offline: mcf_fast._C with CUDA for sm_90, ptxas report, imports", 200, 60, build),
    Step("gpu_tests", "pytest -m gpu: Triton gather/scatter/InfoNCE vs references, CUDA masks == CPU", 150, 60,
         gpu_tests),
    Step("bench_kernels_masks", "python -m benchmarks.run --device cuda --suite kernels,masks", 100, 40,
         bench_kernels_masks),
    Step("bench_step", "python -m benchmarks.run --suite step: engine vs reference, vit-s and vit-b-paper bf16", 140, 50,
         bench_step),
    Step("pretrain", "python -m mcf_fast.pretrain --preset vit-b-paper, synthetic, bf16, 12 steps", 120, 45,
         pretrain),
    Step("bandwidth", "gather/scatter bytes per second vs a measured device-to-device copy", 45, 20, bandwidth),
]
