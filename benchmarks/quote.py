"""Quote a committed benchmark report in a document: its headline table, generated from report.json, never typed.

    python -m benchmarks.quote docs/perf/DATE-MACHINE/report.json     # print the quote of one report
    python -m benchmarks.quote --update docs/performance.md           # refresh every quoted block in a file

A quoted block in a Markdown file sits between `<!-- headline: PATH/report.json -->` and
`<!-- /headline -->` (PATH relative to the repository root); `--update` rewrites what is between
them from the report, and `stale(path)` (what the tests call) lists the blocks that differ from it.
A `<!-- demo: PATH/demo_summary.json -->` ... `<!-- /demo -->` block quotes the summary a demo run
wrote, exactly as the demo printed it (`mcf_fast.demo.summary_table`); a `<!-- plan: PATH.json -->` ...
`<!-- /plan -->` block, the headline numbers of a cost sheet (`python -m mcf_fast.plan ... --json`).
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: the package's imports need `python -m`
    sys.stderr.write("error: run it as a module from the repository root: python -m benchmarks.quote\n")
    raise SystemExit(2)

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from .cli import Parser, refuse  # noqa: E402
from .machine import ROOT  # noqa: E402
from .tables import headline_table  # noqa: E402

PROG = "python -m benchmarks.quote"
BLOCK = re.compile(r"(<!-- (?P<kind>headline|demo|plan): (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /(?P=kind) -->)", re.S)


def quote(report_path: str) -> str:
    """Where the numbers come from (report, command, machine, load, commit, date), then the table."""
    with open(os.path.join(ROOT, report_path)) as f:
        rep = json.load(f)
    m = rep["machine"]
    other = m.get("other_processes_cpu")
    source = (f"From `{report_path}` (`{rep.get('command', 'benchmarks.run')}`): {m['cpu']}, {m['cores']} cores, "
              f"{m.get('gpu') or 'no GPU'}; torch {m['torch']}; git {m['git']}; {m['date']}; load average "
              f"{m['loadavg_start']} -> {m.get('loadavg_end', '?')}, other processes "
              f"{'?' if other is None else f'{other:.0%}'} of the CPU.")
    return f"{source}\n\n{headline_table(rep)}\n"


def quote_demo(summary_path: str) -> str:
    """The demo's closing summary, as it printed it, from a committed demo_summary.json."""
    from mcf_fast.demo import summary_table
    with open(os.path.join(ROOT, summary_path)) as f:
        s = json.load(f)
    return (f"From `{summary_path}` (seed {s['seed']}, {s['teacher_steps']} teacher-stage and {s['steps']} "
            f"MCF-stage steps):\n\n```\n{summary_table(s)}\n```\n")


def quote_plan(sheet_path: str) -> str:
    """A cost sheet's answers in one table: work, memory per GPU, speed and hours over the MFU range, traffic,
    loader and disk; labelled a prediction."""
    with open(os.path.join(ROOT, sheet_path)) as f:
        s = json.load(f)
    r, mem, c, st = s["run"], s["memory"], s["comms"], s["storage"]
    gib, levels = 2.0 ** 30, [s["speed"]["range"][k] for k in ("low", "likely", "high")]
    teacher = sum(v for k, v in s["flops"]["by_part"].items() if k.startswith("teacher")) / s["flops"]["per_image"]
    mfus = " / ".join(f"{x['mfu']:.0%}" for x in levels)
    cores = (s.get("loader") or {}).get("cores_per_gpu")
    rows = [
        ("work per image", f"{s['flops']['per_image'] / 1e9:.1f} GFLOP (the teacher's passes {teacher:.0%})"),
        ("memory per GPU", f"{mem['allocated'] / gib:.1f} GiB allocated, {mem['needed'] / gib:.1f} GiB needed of "
                           f"{mem['capacity'] / gib:.1f}: {'fits' if mem['fits'] else 'does not fit'}"),
        (f"images/s per GPU at {mfus} MFU", " / ".join(f"{x['images_per_s_per_gpu']:,.0f}" for x in levels)),
        (f"the job, {r['optimizer_steps']:,} optimizer steps", " / ".join(f"{x['hours']:.1f}" for x in levels) + " h"),
        ("traffic between GPUs per step", f"{c['per_step']['total'] / gib:.1f} GiB, {c['seconds']:.3f} s over "
                                          f"{c['over']} ({c['share_of_likely_step']:.0%} of the likely step)"),
        ("loader, disk", (f"{cores['low']:.1f}-{cores['high']:.1f} CPU cores per GPU; " if cores else "")
         + f"checkpoint {st['checkpoint'] / gib:.2f} GiB ({st['checkpoint_disk'] / gib:.2f} GiB on disk)"),
    ]
    head = f"{r['world']} x {r['machine']}, {r['precision']}, batch {r['batch']} x accum {r['accum_steps']} per GPU"
    table = "\n".join([f"| {head} | predicted |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])
    return f"From `{sheet_path}` (that command with `--json`); a prediction until a GPU run measures it:\n\n{table}\n"


QUOTERS = {"headline": quote, "demo": quote_demo, "plan": quote_plan}


def _generated(mt: re.Match) -> str:
    return QUOTERS[mt.group("kind")](mt.group("path"))


def refresh(text: str) -> str:
    """`text` with every quoted block regenerated from its report."""
    return BLOCK.sub(lambda mt: mt.group(1) + _generated(mt) + mt.group(5), text)


def stale(doc_path: str) -> list[str]:
    """The reports whose quoted block in `doc_path` differs from what they generate now."""
    with open(doc_path) as f:
        text = f.read()
    return [mt.group("path") for mt in BLOCK.finditer(text) if mt.group("body") != _generated(mt)]


def main(argv=None) -> int:
    ap = Parser(__doc__, PROG)
    ap.add_argument("path", help="a report.json (print its quote) or, with --update, a Markdown file")
    ap.add_argument("--update", action="store_true", help="rewrite the quoted blocks of the Markdown file PATH")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.path):
        refuse(PROG, f"{a.path}: no such file")
    if not a.update:
        print(quote(os.path.relpath(os.path.abspath(a.path), ROOT)), end="")
        return 0
    with open(a.path) as f:
        text = f.read()
    if not BLOCK.search(text):
        refuse(PROG, f"{a.path}: no <!-- headline: REPORT --> ... <!-- /headline --> (or demo) block to update")
    with open(a.path, "w") as f:
        f.write(refresh(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
