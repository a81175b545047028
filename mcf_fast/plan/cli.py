"""`python -m mcf_fast.plan`: the pre-training options (`--preset`, `--SECTION.FIELD`, ...) plus the
cluster and the job; prints the cost sheet (or `--json`). Bad input: one line, exit 2.

The pre-training options come from the pretrain command line's own parser (`mcf_fast.train.cli`), so
every option pretrain takes is accepted here with the same meaning and checks. File checks are left
out on purpose: a plan is often made on a laptop for paths that exist only on the cluster.
"""
from __future__ import annotations

import json
import sys

PROG = "python -m mcf_fast.plan"
GPU_CHOICES = ("h100", "h200", "a100", "cpu")


def _add_plan_options(p) -> None:
    g = p.add_argument_group("plan (the cluster and the job)")
    g.add_argument("--gpu", default="h100", choices=GPU_CHOICES,
                   help="accelerator to plan for (default h100; 'cpu' = this machine)")
    g.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1); world size = gpus x nodes")
    g.add_argument("--images", type=int, default=None,
                   help="images per epoch (default: the synthetic set's size when --data.path is '')")
    g.add_argument("--epochs", type=float, default=None, help="epochs (= --optim.epochs)")
    g.add_argument("--loader-rate", dest="loader_rate", type=float, default=None,
                   help="decode + augment images/s per CPU core (default: measured here for about a second)")
    g.add_argument("--source-px", dest="source_px", type=int, default=None,
                   help="side of the stored images in pixels (default: --data.img_size)")
    g.add_argument("--image-kb", dest="image_kb", type=float, default=None,
                   help="stored KiB per image for the shard storage (default: the measured sample's)")
    g.add_argument("--json", action="store_true", help="print the sheet as JSON")


def _check_plan_options(p, ns) -> None:
    for name in ("gpus", "nodes", "images", "source_px"):
        v = getattr(ns, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} {v}: must be >= 1")
    for name in ("epochs", "loader_rate", "image_kb"):
        v = getattr(ns, name)
        if v is not None and not v > 0:  # also refuses nan
            p.error(f"--{name.replace('_', '-')} {v}: must be > 0")


def parse(argv: list[str]):
    """(Config, Target, namespace) from the command line; exits 2 with one line on bad input."""
    from mcf_fast.train import cli as pretrain_cli

    from .sheet import Target
    cfg, source = pretrain_cli._start_config(argv)
    p = pretrain_cli.build_parser(cfg, source)
    p.prog = PROG
    p.description = ("A cost sheet before the run: work per image, memory per GPU, speed range, collective "
                     "traffic, loader cores and disk for a pre-training setting on a cluster, from the real "
                     "training step traced on fake tensors (no GPU, no weights). Takes every pretrain option; "
                     f"defaults shown are those of {source}.")
    _add_plan_options(p)
    ns, extra = p.parse_known_args(argv)
    if extra:
        pretrain_cli._unknown(p, extra)
    _check_plan_options(p, ns)
    pretrain_cli._apply(cfg, ns, p)
    if ns.epochs is not None:
        cfg.optim.epochs = ns.epochs
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    target = Target(gpu=ns.gpu, gpus=ns.gpus, nodes=ns.nodes, images=ns.images, epochs=cfg.optim.epochs,
                    loader_rate=ns.loader_rate, source_px=ns.source_px, image_kb=ns.image_kb)
    return cfg, target, ns


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, target, ns = parse(argv)
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .sheet import plan_sheet
    from .table import render
    try:
        sheet = plan_sheet(cfg, target)
    except ValueError as e:  # e.g. a precision the target cannot run, an unreadable teacher checkpoint
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(sheet, indent=2, default=str) if ns.json else render(sheet))
    return 0


__all__ = ["main", "parse"]
