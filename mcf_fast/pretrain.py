"""`python -m mcf_fast.pretrain [--preset demo|vit-s|vit-b-paper] [--out DIR] [--SECTION.FIELD VALUE ...]`

Without arguments: the `demo` preset, a small ViT pre-trained on synthetic faces on the CPU in a few
minutes. Rerunning the same command with the same --out resumes from the last complete checkpoint.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    from mcf_fast.train.cli import parse_args
    cfg, ns = parse_args(argv)
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from mcf_fast.train.loop import NonFiniteError, train
    try:
        train(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
