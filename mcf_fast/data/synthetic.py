"""`python -m mcf_fast.data.synthetic`: write synthetic faces to disk (pre-training shards, AFLW-19, LaPa).

The faces are drawn by `mcf_fast.data.faces` (conventions and labels documented there) and written by
`mcf_fast.data.formats` (the on-disk layouts). This module is only the command line; the drawing
names are re-exported here because callers have long imported them from `mcf_fast.data.synthetic`.

    python -m mcf_fast.data.synthetic --out DIR --num N --size S --format wds|aflw19|lapa [--seed K]

A progress bar (faces written) goes to stderr; the last line on stdout says what was written where.
"""
from __future__ import annotations

import argparse
import sys

from .faces import AFLW19_NAMES, FACE_HALF_H, LANDMARK_CLASSES, LAPA_CLASSES, LM_INSET, Face, draw_face, face_params

__all__ = ["AFLW19_NAMES", "FACE_HALF_H", "LANDMARK_CLASSES", "LAPA_CLASSES", "LM_INSET", "Face", "draw_face",
           "face_params", "main"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mcf_fast.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--num", type=int, required=True, help="number of faces")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--format", choices=("wds", "aflw19", "lapa"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=1000, help="wds: samples per shard")
    ap.add_argument("--train-fraction", type=float, default=0.8,
                    help="aflw19/lapa: fraction of faces in the training split (rest: test, or val+test)")
    a = ap.parse_args(argv)
    if a.num < 1 or a.size < 32:
        ap.error("--num must be >= 1 and --size >= 32 (features vanish below 32 px)")
    if not 0 < a.train_fraction < 1:
        ap.error("--train-fraction must be in (0, 1)")
    from mcf_fast.outputs import check_output
    try:
        check_output(a.out, [])  # never into a run's checkpoints/
    except ValueError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    from . import formats
    writer = {"wds": formats.write_wds, "aflw19": formats.write_aflw19, "lapa": formats.write_lapa}[a.format]
    kw = {"shard_size": a.shard_size} if a.format == "wds" else {"train_fraction": a.train_fraction}
    from tqdm import tqdm
    with tqdm(total=a.num, unit="face", desc=f"synthetic {a.format}", file=sys.stderr) as bar:
        summary = writer(a.out, a.num, a.size, a.seed, tick=lambda: bar.update(1), **kw)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
