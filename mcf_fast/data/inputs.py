"""What `prepare` reads: its input split into units, the raw samples of a unit, and the out/in check.

A unit is ("shard", path) for an input shard or ("files", [paths]) for `--per-unit` files of a folder
or list file; unit u becomes `faces-u.tar`. The input is recognised and checked by the data source
registry (`sources.py`), so its errors name `--input` and say what the path is. Reading goes through
the loader's guarded readers (`files.read_regular`, `index.walk_tar`), so prepare skips and counts
exactly what the loader would: a tar cut mid-member keeps its readable samples, a FIFO is never opened.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .config import DataConfig
from .files import MAX_FILE_MB, pread_member, read_regular
from .index import image_member, walk_tar
from .reasons import BadSample
from .sources import SOURCES, expand_shards, open_data


def plan_units(spec: str, per_unit: int, max_bytes: int = MAX_FILE_MB << 20) -> tuple[list, Counter]:
    """([(kind, shard path | list of files)] in a stable order, what listing the input left out).
    The input is recognised and checked by the data source registry, its errors naming `--input`."""
    cfg = DataConfig(path=spec, max_file_mb=max(1, max_bytes >> 20))
    src = open_data(cfg, option="--input")
    if getattr(src, "shards", None) is not None:  # any kind read from tar shards
        return [("shard", s) for s in src.shards if os.path.exists(s)], Counter()
    if getattr(src, "paths", None) is not None:  # any kind read from image files
        units = [("files", src.paths[i:i + per_unit]) for i in range(0, src.num_samples, per_unit)]
        return units, Counter(src.index_stats)
    raise ValueError(f"--input {spec!r} is {SOURCES.get(src.kind).summary}: prepare reads image files (a folder "
                     "or a list file) or webdataset shards")


class Skips:
    """Inputs left out, by reason (`reasons.SKIP` names), with the first few of each by name: what
    prepare's summary and manifest show."""

    EXAMPLES = 3

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, name: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if name and len(ex) < self.EXAMPLES:
            ex.append(name)

    def update(self, counts: Counter) -> None:
        """Counts without names (problems of a whole shard, met while walking it)."""
        self.counts.update(counts)


def unit_inputs(unit, skips: Skips, max_bytes: int = MAX_FILE_MB << 20):
    """Yield (key, image bytes or None, meta dict or None, name) for each sample of one unit; why an
    image is None is already added to `skips` (as are shard problems the tar walk met)."""
    kind, spec = unit
    if kind == "files":
        for p in spec:
            key = os.path.splitext(os.path.basename(p))[0]
            try:
                yield key, read_regular(p, max_bytes), None, p
            except BadSample as e:
                skips.add(e.reason, p)
                yield key, None, None, p
        return
    members, walk = walk_tar(spec, max_bytes)
    skips.update(walk)
    if not members:
        return
    fd = os.open(spec, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        for key, comps in members:
            exts = {ext.lower(): (off, size) for ext, off, size in comps}
            name = f"{spec}:{key}"
            yield key.replace("/", "_"), _member(fd, exts, image_member(exts), spec, key, skips, max_bytes, name), \
                _meta(fd, exts, spec, key, max_bytes), name
    finally:
        os.close(fd)


def _member(fd, exts, ext, shard, key, skips, max_bytes, name):
    if ext is None:
        skips.add("missing_image", name)
        return None
    try:
        return pread_member(fd, *exts[ext], max_bytes, shard, key)
    except BadSample as e:
        skips.add(e.reason, name)
        return None


def _meta(fd, exts, shard, key, max_bytes):
    if "json" not in exts:
        return None
    try:
        return json.loads(pread_member(fd, *exts["json"], max_bytes, shard, key))
    except (BadSample, ValueError):  # a sample's metadata is optional: unreadable means absent
        return None


def input_folders(spec: str) -> list[str]:
    """The folders an input spec reads from (a folder, the folders of its shards or listed files)."""
    if os.path.isdir(spec):
        return [spec]
    if spec.endswith((".txt", ".lst", ".list")) and os.path.isfile(spec):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        return sorted({base} | {os.path.dirname(ln if os.path.isabs(ln) else os.path.join(base, ln)) for ln in lines})
    return sorted({os.path.dirname(os.path.abspath(s)) for s in expand_shards(spec)})


def check_apart(spec: str, out: str) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder, or lies in a checkpoint
    folder (symlinks resolved; `mcf_fast.outputs`): writing there would replace or mix with the raw data
    (`--out` = `--input` once replaced 64 raw images by 21 crops)."""
    from mcf_fast.outputs import check_output
    check_output(out, input_folders(spec), contains=True)
