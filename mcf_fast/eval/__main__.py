"""`python -m mcf_fast.eval alignment|parsing --data DIR --encoder FILE|random --out DIR [...]`, or
`python -m mcf_fast.eval paper --encoder FILE --aflw19 DIR --lapa DIR --out OUT` (both tasks, one table)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import EvalConfig, add_arguments
from .paper import add_paper_arguments
from .runlog import plain


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mcf_fast.eval",
                                description="Fine-tune a pre-trained (or random) ViT encoder on a downstream "
                                            "face task and score it as FaRL does.")
    sub = p.add_subparsers(dest="task", required=True, metavar="{alignment,parsing,paper}")
    for task, what in (("alignment", "AFLW-19 landmarks: NME_diag / NME_box / NME_inter-ocular, AUC and FR at 0.07"),
                       ("parsing", "LaPa face parsing: F1 per class, mean over the 10 foreground classes")):
        add_arguments(sub.add_parser(task, help=what, description=what))
    what = "both tasks from one checkpoint (resumable), ending with the table against the paper and FaRL"
    add_paper_arguments(sub.add_parser("paper", help=what, description=what))
    return p


def _paper(args) -> int:
    from mcf_fast.outputs import check_output, read_paths

    from .paper import run_paper
    from .paper_table import paper_markdown
    try:
        check_output(args.out, read_paths(args.aflw19, args.lapa, args.encoder, args.arch))  # before any work
        out = run_paper(args)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out) if "stopped_at" in out else paper_markdown(out), flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.task == "paper":
        return _paper(args)
    cfg = EvalConfig(**vars(args))
    from mcf_fast.outputs import check_output, read_paths

    from .train import run  # torch and friends load only once the arguments are known to be sane
    try:
        cfg.validate()
        check_output(cfg.out, read_paths(cfg.data, cfg.encoder, cfg.arch))  # nothing written over an input
        out = run(cfg)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = [k for k in out if k.startswith(("nme", "auc", "fr_", "f1_mean", "stopped", "best"))]
    print(json.dumps(plain({k: out[k] for k in keys}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
