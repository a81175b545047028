"""`python -m mcf_fast.pretrain [--preset demo|vit-s|vit-b-paper] [--out DIR] [--SECTION.FIELD VALUE ...]`

Without arguments: the demo (`mcf_fast.demo`): a small MAE teacher, then MCF against it, on synthetic
faces on the CPU in a few minutes, ending with a summary of what was learnt. With arguments: one run
of the preset (default `demo`). Rerunning the same command with the same --out resumes.
"""
from __future__ import annotations

import json
import sys

PROG = "python -m mcf_fast.pretrain"


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the run said where it stopped; no traceback
        from mcf_fast.train.interrupt import exit_status
        return exit_status(e)


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the embedded default: the two-stage demo (MAE teacher, then MCF against it)
        from mcf_fast.demo import run_demo
        run_demo()
        return 0
    from mcf_fast.train.cli import parse_args
    cfg, ns = parse_args(argv)
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from mcf_fast.pickle_bounds import RefusedFile
    from mcf_fast.plan.check import WontFit
    from mcf_fast.train.checks import BadInput
    from mcf_fast.train.dcp_safe import CheckpointError
    from mcf_fast.train.loop import NonFiniteError, train
    try:
        train(cfg)
    except (BadInput, WontFit, RefusedFile) as e:  # bad input (a value, a file a reader refused, a setting
        print(f"{PROG}: error: {e}", file=sys.stderr)  # that cannot fit): one line
        return 2
    except NonFiniteError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # damaged, hostile or unwritable checkpoints or run folder: which and why
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 4
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
