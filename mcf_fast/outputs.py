"""No tool writes over its own input or a checkpoint: the one check `convert`, `prepare`, `eval` and
`synthetic` make on their outputs before any work.

`check_output(outs, inputs)` refuses, after resolving symlinks (`realpath`: a link to the input is the
input), an output path that
- is one of the inputs (`convert mae.pth --out mae.pth` replaced its input and exited 0),
- lies inside an input folder (prepare's crops mixed into the raw images),
- with `contains=True`, contains an input folder (prepare: `--out` the parent of `--input`),
- is, or lies inside, a checkpoint folder or a run's `checkpoints/` (`convert RUN --out
  RUN/checkpoints/step_N/__0_0.distcp` destroyed the newest checkpoint).
Every refusal is a ValueError whose one line names the flag, both paths and the fix; the tools turn it
into exit 2.
"""
from __future__ import annotations

import os
import re

_STEP = re.compile(r"^step_\d+(\.tmp|\.del)?$")


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def checkpoint_folder(path: str) -> str | None:
    """The checkpoint folder (holding `.metadata` or `COMPLETE`) or run `checkpoints/` folder (holding
    step_N folders) that the real path of `path` is or lies inside; None when there is none."""
    p = os.path.realpath(path)
    while True:
        if os.path.isdir(p):
            try:
                names = os.listdir(p)
            except OSError:
                names = []
            if ".metadata" in names or "COMPLETE" in names or _STEP.match(os.path.basename(p)):
                return p
            if os.path.basename(p) == "checkpoints" and any(_STEP.match(n) for n in names):
                return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def read_paths(*specs: str) -> list[str]:
    """The existing paths among a command's arguments, an export folder standing for the two files read
    from it (`--encoder runs/demo` reads runs/demo/encoder.safetensors and encoder.json, so an output
    beside them is not "inside an input"); 'random', preset names and '' name nothing."""
    out = []
    for spec in specs:
        if spec and os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "encoder.safetensors")):
            out += [os.path.join(spec, "encoder.safetensors"), os.path.join(spec, "encoder.json")]
        elif spec and os.path.exists(spec):
            out.append(spec)
    return out


def check_output(outs, inputs, *, flag: str = "--out", contains: bool = False) -> None:
    """Refuse (ValueError, one line) any path of `outs` that would write over an input or a checkpoint."""
    outs = [outs] if isinstance(outs, str) else list(outs)
    inputs = [inputs] if isinstance(inputs, str) else [p for p in inputs if p]
    for out in outs:
        o = os.path.realpath(out)
        for inp in inputs:
            r = os.path.realpath(inp)
            how = ("is" if o == r else "lies inside" if _inside(o, r) else
                   "contains" if contains and _inside(r, o) else None)
            if how:
                raise ValueError(f"{flag} {out} {how} the input {inp}: writing there would overwrite or mix with "
                                 "what this command reads; choose an output outside the input(s)")
        ck = checkpoint_folder(out)
        if ck is not None:
            raise ValueError(f"{flag} {out} lies in the checkpoint folder {ck}: writing there could replace a "
                             "checkpoint; choose an output outside the run's checkpoints/")


__all__ = ["check_output", "checkpoint_folder", "read_paths"]
