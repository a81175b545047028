"""What `prepare` records in its `--out` and says at the end.

- `settings`: everything that decides which crops a unit yields (the input, size, margin, detector,
  face limits, JPEG quality, box file, unit split, size limits). They go into `manifest.json` before
  the first unit is cropped, so even an interrupted run's folder knows how it was made.
- `check_resume`: a rerun into the same `--out` resumes only with the same settings; otherwise one
  line naming each difference and the fix (without it a rerun with another --size kept the old crops
  and relabelled the manifest). A folder holding shards another tool wrote is refused too.
- `summary`: the closing lines: images in, crops out, and every skipped input by reason, with the
  reason's meaning and the first few names.
"""
from __future__ import annotations

import os

from .index import MANIFEST, read_manifest
from .reasons import SKIP

# Keys an older prepare wrote at the top of its manifest (at the end of a run only).
_LEGACY = ("size", "margin", "detector", "min_face")


def settings(inp: str, opts: dict, per_unit: int, max_file_mb: int) -> dict:
    """The settings a resume must match (paths made absolute: a rerun from another folder is the same)."""
    return {"input": os.path.abspath(inp), "size": opts["size"], "margin": opts["margin"],
            "detector": opts["detector"], "min_face": opts["min_face"], "max_faces": opts["max_faces"],
            "quality": opts["quality"], "boxes": os.path.abspath(opts["boxes"]) if opts["boxes"] else "",
            "box_format": opts["box_format"], "min_score": opts["min_score"], "per_unit": per_unit,
            "max_file_mb": max_file_mb, "max_pixels": opts["max_pixels"]}


def check_resume(out: str, now: dict) -> None:
    """Refuse (one-line ValueError) to add to an --out made with other settings or by another tool."""
    man = read_manifest(out) if os.path.isdir(out) else {}
    shards = man.get("shards", {})
    if not shards:
        return
    tools = sorted({str(e.get("validated_by")) for e in shards.values()} - {"prepare"})
    if tools:
        raise ValueError(f"--out {out} holds shards written by {tools[0]}, not by prepare "
                         f"({os.path.join(out, MANIFEST)}): give an empty or new --out")
    old = man.get("settings") or {k: man[k] for k in _LEGACY if k in man}
    if not old:
        raise ValueError(f"--out {out} was begun by an older prepare that did not record its settings: give a "
                         f"new --out, or delete {out} to start over")
    diff = [k for k in now if k in old and old[k] != now[k]]
    if diff:
        said = "; ".join(f"--{k.replace('_', '-')} {_shown(old[k])} there, {_shown(now[k])} now" for k in diff)
        raise ValueError(f"--out {out} was made with other settings ({said}): rerun with its settings to resume "
                         f"it, or give a new --out (or delete {out}) to start over")


def _shown(v) -> str:
    return repr(v) if v == "" else str(v)


def merged_examples(man: dict) -> dict[str, list[str]]:
    """The first few skipped names per reason over every unit of the manifest."""
    out: dict[str, list[str]] = {}
    for name in sorted(man.get("shards", {})):
        for reason, names in man["shards"][name].get("skipped_examples", {}).items():
            ex = out.setdefault(reason, [])
            ex.extend(names[:max(0, 3 - len(ex))])
    return out


def _short(name: str, inp: str) -> str:
    base = os.path.abspath(inp)
    if os.path.isdir(base) and name.startswith(base + os.sep):
        return os.path.relpath(name, base)
    return name


def summary(man: dict, inp: str, out: str) -> list[str]:
    """The closing lines of a prepare run (see the module docstring)."""
    shards = man.get("shards", {})
    n_in = sum(e.get("inputs", 0) for e in shards.values())
    files = sum(1 for e in shards.values() if not e.get("empty"))
    lines = [f"{n_in} images in, {man['samples']} face crop(s) out, in {files} shard(s) "
             f"({man.get('reused_units', 0)} unit(s) already done), detector "
             f"{man.get('settings', {}).get('detector', '?')}"]
    skipped = man.get("skipped_by_reason", {})
    examples = merged_examples(man)
    if skipped:
        lines.append(f"skipped {sum(skipped.values())} by reason:")
        width = max(len(r) for r in skipped)
        for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = examples.get(reason, [])
            eg = f" (e.g. {', '.join(_short(x, inp) for x in ex)})" if ex else ""
            lines.append(f"  {reason:<{width}} {n:>7}  {SKIP.get(reason, '')}{eg}")
    else:
        lines.append("skipped: none")
    listing = man.get("input_skipped_by_reason") or {}
    if listing:
        lines.append("left out of the input listing: "
                     + ", ".join(f"{r} {n} ({SKIP.get(r, '')})" for r, n in sorted(listing.items())))
    lines.append(f"manifest: {os.path.join(out, MANIFEST)}")
    return lines
