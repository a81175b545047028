"""Every speed and memory claim of mcf_fast, measured in one process against the baseline a user would
otherwise run, on whatever machine it is given, within a wall-clock budget.

    python -m benchmarks.run --suite kernels|masks|data|step|all --device cpu|cuda --out DIR
                             [--quick] [--compare OLD.json] [--budget-s S] [--step-batch N]
                             [--step-configs PRESET:PRECISION,...] [--threads N]

Suites: kernels (each mcf_fast.kernels op vs its own *_ref), masks (random_masks vs MAE's recipe),
data (loaders vs the torch DataLoader path), step (the engine's training step vs the reference step).
Every provider is checked against its reference before it is timed; a provider that disagrees makes
its row FAILED (no ratio) and the exit status 1. The budget (default 780 s, --quick 180 s) holds for
the whole process: each suite gets a share of what is left, every measurement that would not fit is
skipped and named in the report, and the report is written within the budget. Writes DIR/report.json,
DIR/report.md, DIR/speedups.png, DIR/memory.png, with the step suite DIR/step_phases.png (and
DIR/profile_step.txt when a profiled configuration ran), and prints the Markdown report last.
"""
from __future__ import annotations

import sys
import time

T0 = time.monotonic()  # the budget counts the whole process, torch's import included
if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run the benchmarks as a package from the repository root: python -m benchmarks.run "
                     + " ".join(sys.argv[1:]) + "\n")
    raise SystemExit(2)

import json  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402

from .budget import Budget  # noqa: E402
from .cli import Parser, refuse  # noqa: E402
from .rows import add_ratios, failed, row  # noqa: E402
from .tables import compare, to_markdown  # noqa: E402

PROG = "python -m benchmarks.run"
SUITES = ("kernels", "masks", "data", "step")
WEIGHTS = {"kernels": 2, "masks": 1, "data": 2, "step": 5}  # shares of the budget; unused time flows to later suites
BUDGET_S = {False: 780.0, True: 180.0}  # 780: a 15-minute GPU lease less start-up and writing; --quick: a smoke run
METHOD = ("Timing: warm-up rounds, then timed rounds that call every provider once each (round-robin), each call "
          "on fresh inputs; CPU: time.perf_counter (monotonic), GPU: CUDA events. Every provider is checked against "
          "its reference before it is timed. Peak memory: CPU = resident-set high-water mark of one call above the "
          "resident set before it (glibc free pages returned with malloc_trim, kernel peak reset via "
          "/proc/self/clear_refs); GPU = torch.cuda.max_memory_allocated above the allocation before the call. Step "
          "peak = model + optimizer state bytes + that per-step peak.")


def build_parser() -> Parser:
    ap = Parser(__doc__, PROG)
    ap.add_argument("--suite", default="all", help="kernels, masks, data, step or all (comma-separated list allowed)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="bench_out", help="report folder (created; default bench_out)")
    ap.add_argument("--quick", action="store_true", help="small shapes, the demo preset only (a smoke run)")
    ap.add_argument("--compare", default="", help="an earlier report.json: print the change of each row measured in both")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help=f"wall-clock budget of the whole run in seconds (0 = {BUDGET_S[False]:.0f}, with --quick "
                         f"{BUDGET_S[True]:.0f}); each suite gets a share, what does not fit is skipped and named")
    ap.add_argument("--step-batch", type=int, default=0, help="fix the step suite's batch (0 = the largest that fits)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--step-configs", default="", help="step suite: only these PRESET:PRECISION pairs, comma-"
                    "separated (e.g. vit-s:bf16,vit-b-paper:bf16; default: the device's whole plan)")
    return ap


def _suites(arg: str) -> list[str]:
    names = [s.strip() for s in arg.split(",") if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        refuse(PROG, f"--suite {arg!r}: choose from {', '.join(SUITES)} or all (comma-separated)")
    return [s for s in SUITES if s in names]


def _check_compare(path: str) -> None:
    if not os.path.isfile(path):
        refuse(PROG, f"--compare {path}: no such file (pass an earlier DIR/report.json)")
    try:
        with open(path) as f:
            rows = json.load(f).get("rows") if os.path.getsize(path) < 64 * 2**20 else None
    except (OSError, ValueError, AttributeError):
        rows = None
    if not isinstance(rows, list):
        refuse(PROG, f"--compare {path}: not a report.json of this tool (no list of rows): pass an earlier DIR/report.json")


def parse(argv=None):
    """The arguments, every one checked before anything is measured or written (errors: one line, exit 2)."""
    a = build_parser().parse_args(argv)
    a.suites = _suites(a.suite)
    if a.step_batch == 1 or a.step_batch < 0:
        refuse(PROG, f"--step-batch {a.step_batch}: give 0 (the largest that fits) or >= 2 (the heads' BatchNorm "
                     "needs 2 samples)")
    if a.budget_s < 0 or a.threads < 0:
        refuse(PROG, "--budget-s and --threads must be >= 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        refuse(PROG, f"--out {a.out} is a file: give a folder")
    parent = os.path.abspath(a.out)
    while not os.path.exists(parent):  # the folder it would be created in must be writable
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        refuse(PROG, f"--out {a.out}: {parent} is not writable; give a folder you can write to")
    if a.compare:
        _check_compare(a.compare)
    a.only = tuple(tuple(c.split(":", 1)) for c in a.step_configs.split(",") if c)
    if a.only:
        from .suite_step import known_configs
        known = known_configs()
        if any(c not in known for c in a.only):
            refuse(PROG, f"--step-configs {a.step_configs!r}: give PRESET:PRECISION pairs from "
                         f"{', '.join(sorted(f'{p}:{q}' for p, q in known))}")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            refuse(PROG, "--device cuda but torch sees no CUDA device: use --device cpu")
    return a


def run_suites(a, device, budget: Budget) -> dict:
    """Each suite in turn with its share of the budget; a broken suite must not hide the others' results."""
    from . import suite_data, suite_kernels, suite_masks, suite_step
    from .harness import ProviderMismatch
    mods = {"kernels": suite_kernels, "masks": suite_masks, "data": suite_data, "step": suite_step}
    out = {"rows": [], "goals": [], "step_notes": "", "profile": [], "baselines": []}
    for i, s in enumerate(a.suites):
        part = budget.share(WEIGHTS[s], sum(WEIGHTS[t] for t in a.suites[i:]))
        t = time.monotonic()
        out["baselines"].append(mods[s].BASELINES)
        try:
            if s == "step":
                res = suite_step.run(device, a.quick, part, batch=a.step_batch, threads=a.threads, only=a.only)
                out.update(goals=res["goals"], step_notes=res["notes"], profile=res["profile"], peaks=res["peaks"])
                out["rows"] += res["rows"]
            else:
                out["rows"] += mods[s].run(device, a.quick, part)
        except ProviderMismatch as e:
            out["rows"].append(row(s, "provider check", "-", "-", "-", note=f"FAILED: {e}"))
        except Exception as e:  # noqa: BLE001 - reported as a FAILED row; the exit status says it
            traceback.print_exc()
            out["rows"].append(row(s, "suite crashed", "-", "-", "-", note=f"FAILED: {type(e).__name__}: {e}"))
        print(f"[{PROG}] suite {s}: {time.monotonic() - t:.0f} s (its share: {part.seconds:.0f} s)", file=sys.stderr,
              flush=True)
    add_ratios(out["rows"])
    return out


def write(out_dir: str, report: dict, profile: list[str]) -> list[str]:
    """report.json, report.md, the PNG charts and profile_step.txt; returns the paths written."""
    from .charts import plot
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(to_markdown(report) + "\n")
    if profile:
        paths.append(os.path.join(out_dir, "profile_step.txt"))
        with open(paths[-1], "w") as f:
            f.write("\n\n".join(profile) + "\n")
    return paths + plot(out_dir, report)


def main(argv=None, start: float | None = None) -> int:
    a = parse(argv)
    start = time.monotonic() if start is None else start
    budget_s = a.budget_s or BUDGET_S[a.quick]
    # measuring stops this much before the end, so that writing the report keeps the run within its budget
    budget = Budget(budget_s - min(15.0, 0.15 * budget_s), start=start)
    import torch

    from .machine import OtherLoad, machine_info
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    others, machine = OtherLoad(), machine_info(device)
    res = run_suites(a, device, budget)
    share = others.share()
    machine.update(loadavg_end=round(os.getloadavg()[0], 2), wall_s=round(time.monotonic() - start, 1),
                   other_processes_cpu=None if share is None else round(share, 3))
    if res.get("peaks"):
        machine["matmul_peak"] = res["peaks"]
    argv = sys.argv[1:] if argv is None else argv
    rep = {"command": " ".join([PROG, *argv]), "suites": a.suites, "device": a.device, "quick": a.quick,
           "machine": machine, "rows": res["rows"],
           "goals": res["goals"], "step_notes": res["step_notes"], "method": METHOD, "baselines": res["baselines"],
           "budget": {"budget_s": budget_s, "measure_s": time.monotonic() - start, "skipped": budget.skipped}}
    write(a.out, rep, res["profile"])
    if a.compare:
        with open(a.compare) as f:
            print(compare(rep, json.load(f)) + "\n")
    print(to_markdown(rep))
    return 1 if failed(rep["rows"]) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(start=T0))
    except KeyboardInterrupt:  # the suites' temporary folders are already removed; the children died with us
        sys.stderr.write(f"{PROG}: interrupted; no report written\n")
        sys.exit(130)
