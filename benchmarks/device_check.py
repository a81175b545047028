"""One prepared command that proves every GPU path of mcf_fast on a bare, offline H100/H200 machine.

    python -m benchmarks.device_check --prep                       # here, with a registry: gpu_wheels/
    python -m benchmarks.device_check --out DIR [--budget-s 480]   # there (docs/gpu/README.md)
    python -m benchmarks.device_check --out DIR --dry-run          # the steps, time boxes, predictions

In order, each step time-boxed and its result written to DIR/report.{md,json} as it finishes: the
cost sheet's predictions (mcf_fast.plan, on the CPU) for the pretrain and step runs on this GPU; the
carried wheels installed offline; README's install building mcf_fast._C with CUDA for sm_90; every
GPU-marked test; benchmarks.run's kernels and masks suites and its step suite (vit-s, vit-b-paper,
bf16); a short vit-b-paper pre-training run (images/s, MFU, memory, data wait); the gather/scatter
kernels' share of the copy bandwidth. The report sets each prediction beside its measurement
(images/s, MFU, peak memory). Without a CUDA device every GPU step is reported
'skipped: no CUDA device' (the predictions are still made) and the exit status is 0. DIR holds at most 4 files (report.md,
report.json, logs.txt, artifacts.tar.gz), within what the device tool brings back.
Exit status: 0 when no step failed or timed out, 1 otherwise, 2 for bad arguments.
"""
import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.device_check "
                     + " ".join(sys.argv[1:]) + "\n")
    raise SystemExit(2)

import os  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from .cli import Parser  # noqa: E402
from .device_kit import predict as PR  # noqa: E402
from .device_kit import prep  # noqa: E402
from .device_kit import report as RP  # noqa: E402
from .device_kit.items import STEPS  # noqa: E402
from .device_kit.runner import Context, plan_deadlines, run_steps  # noqa: E402
from .machine import ROOT  # noqa: E402
from .tables import md_table  # noqa: E402

PROG = "python -m benchmarks.device_check"


def _args(argv):
    ap = Parser(__doc__, PROG)
    ap.add_argument("--out", default="", help="report folder (created; must be empty or hold an earlier report)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all steps (default 480)")
    ap.add_argument("--work", default="", help="scratch folder for builds, runs, logs (default: a new /tmp folder)")
    ap.add_argument("--only", default="", help="comma-separated step names to run (default: all, in order)")
    ap.add_argument("--prep", action="store_true", help="download gpu_wheels/ and record the git sha, then exit")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, time boxes and paths, and the cost "
                    "sheet's predictions (a few seconds of CPU); run nothing else")
    ap.add_argument("--plan-gpu", default="auto", choices=PR.GPU_CHOICES,
                    help="the machine the predictions are for (default auto: this CUDA device, else h200)")
    ap.add_argument("--no-skip", action="store_true", help="run the steps even without CUDA (to try the install "
                    "and build steps on a CPU machine; the GPU steps then fail)")
    a = ap.parse_args(argv)
    names = [s.name for s in STEPS]
    only = [n for n in a.only.split(",") if n]
    bad = [n for n in only if n not in names]
    if bad:
        ap.error(f"--only {','.join(bad)}: unknown step; choose from {','.join(names)}")
    if not a.prep and not a.out:
        ap.error("--out DIR is required (or --prep to build the wheels folder)")
    if not 30 <= a.budget_s <= 3600:
        ap.error(f"--budget-s {a.budget_s:g}: give 30..3600 seconds (480 fits a 15-minute GPU lease twice)")
    if a.out and os.path.isfile(a.out):
        ap.error(f"--out {a.out} is a file: give a folder")
    a.steps = [s for s in STEPS if not only or s.name in only]
    return a


def _artifacts(work: str, out: str) -> None:
    """The scratch folder's small outputs (run.py reports and plots, junit, metrics), one archive."""
    keep = (".json", ".jsonl", ".md", ".png", ".txt", ".xml", ".log")
    with tarfile.open(os.path.join(out, "artifacts.tar.gz.tmp"), "w:gz") as tar:
        for d, _, files in os.walk(work):
            for f in files:
                p = os.path.join(d, f)
                if f.endswith(keep) and os.path.getsize(p) < 4 * 2**20:
                    tar.add(p, arcname=os.path.relpath(p, work))
    os.replace(os.path.join(out, "artifacts.tar.gz.tmp"), os.path.join(out, "artifacts.tar.gz"))


def _print_predictions(plan_gpu: str) -> None:
    """The dry run's predictions: the plan step alone, every measurement 'not run'."""
    try:
        plan = PR.make_plan(plan_gpu)
    except Exception as e:  # noqa: BLE001 - the dry run says so and still lists the steps
        print(f"\npredictions: failed ({type(e).__name__}: {e})")
        return
    print(f"\npredicted by the cost sheet ({plan['gpu']['why']}; {plan['plan_s']:.1f} s):")
    print(md_table(RP.CALIBRATION_COLUMNS, PR.compare({"plan": plan}, "not run: --dry-run")))


def main(argv=None) -> int:
    a = _args(argv)
    if a.prep:
        return prep.prep()
    if a.dry_run:
        for s, box in zip(a.steps, plan_deadlines(a.steps, a.budget_s)):
            print(f"{s.name:22s} box {box:5.0f} s (cap {s.cap_s:.0f}, kept free {s.floor_s:.0f})  {s.what}")
        print(f"wheels: {prep.WHEELS} ({'present' if os.path.isdir(prep.WHEELS) else 'missing: run --prep'}); "
              f"git sha: {prep.git_sha()}")
        _print_predictions(a.plan_gpu)
        return 0
    import torch
    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="mcf_device_check_")
    os.makedirs(work, exist_ok=True)
    site = os.path.join(work, "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, site, os.environ.get("PYTHONPATH", "")]).rstrip(":"),
               PYTHONUNBUFFERED="1", MCF_FAST_REQUIRE_EXT="1", MCF_KIT_SITE=site)
    log = os.path.join(a.out, "logs.txt")
    open(log, "w").close()
    ctx = Context(root=ROOT, out=a.out, work=work, env=env, log_path=log, cuda=torch.cuda.is_available() or a.no_skip,
                  python=sys.executable, plan_gpu=a.plan_gpu)
    t0 = time.monotonic()
    rep = {"command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
           "budget_s": a.budget_s, "machine": RP.machine(), "finished": False, "wall_s": 0.0, "steps": []}

    def flush():
        rep.update(wall_s=time.monotonic() - t0, steps=[dict(ctx.results[s.name], predicted=PR.step_cell(s.name, ctx.results))
                                                       for s in a.steps if s.name in ctx.results],
                   predicted_vs_measured=PR.compare(ctx.results, "not run (--only)" if rep["finished"] else "not run yet"))
        RP.write(a.out, rep)

    flush()
    run_steps(ctx, a.steps, a.budget_s, flush)
    rep["finished"] = True
    flush()
    _artifacts(work, a.out)
    print(open(os.path.join(a.out, "report.md")).read())
    bad = [r["step"] for r in rep["steps"] if r["status"] in ("failed", "timeout")]
    print(f"device check: {len(rep['steps']) - len(bad)} of {len(rep['steps'])} steps passed or skipped"
          + (f"; failed: {', '.join(bad)}" if bad else "") + f"; report in {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
