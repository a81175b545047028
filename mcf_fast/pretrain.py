"""`python -m mcf_fast.pretrain [--preset demo|vit-s|vit-b-paper] [--out DIR] [--SECTION.FIELD VALUE ...]`

Without arguments: the demo (`mcf_fast.demo`): a small MAE teacher, then MCF against it, on synthetic
faces on the CPU in a few minutes, ending with a summary of what was learnt. With arguments: one run
of the preset (default `demo`). Rerunning the same command with the same --out resumes.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
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
    from mcf_fast.train.dcp_safe import CheckpointError
    from mcf_fast.train.loop import NonFiniteError, train
    try:
        train(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # damaged, hostile or unwritable checkpoints: the message says which and why
        print(f"error: {e}", file=sys.stderr)
        return 4
    except RefusedFile as e:  # a reader refused an input file (out of bounds, code, not that format): one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
