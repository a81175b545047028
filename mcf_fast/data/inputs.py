"""What `prepare` reads: its input split into units, the raw samples of a unit, and the out/in check.

A unit is ("shard", path) for an input shard or ("files", [paths]) for `--per-unit` files of a folder
or list file; unit u becomes `faces-u.tar`. Reading goes through the same guarded readers as the
loader (`files.read_regular`, `index.walk_tar`), so prepare skips and counts exactly what the loader
would: a tar cut mid-member keeps its readable samples, a FIFO is never opened.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .files import MAX_FILE_MB, pread_member, read_regular
from .index import image_member, walk_tar
from .reasons import BadSample
from .sources import FileListSource, ShardSource, expand_shards, open_source


def plan_units(spec: str, per_unit: int, max_bytes: int = MAX_FILE_MB << 20) -> tuple[list, Counter]:
    """([(kind, shard path | list of files)] in a stable order, what listing the input left out)."""
    src = open_source(spec, seed=0, img_size=8, synthetic_size=1, cache_mb=0, max_bytes=max_bytes)
    if isinstance(src, ShardSource):
        return [("shard", s) for s in src.shards if os.path.exists(s)], Counter()
    if isinstance(src, FileListSource):
        units = [("files", src.paths[i:i + per_unit]) for i in range(0, src.num_samples, per_unit)]
        return units, Counter(src.index_stats)
    raise ValueError("prepare needs a folder, a list file or shards as --input")


def unit_inputs(unit, stats: Counter, max_bytes: int = MAX_FILE_MB << 20):
    """Yield (key, image bytes or None, meta dict or None) for one unit; why an image is None is
    counted in `stats` (as are shard problems the tar walk met)."""
    kind, spec = unit
    if kind == "files":
        for p in spec:
            key = os.path.splitext(os.path.basename(p))[0]
            try:
                yield key, read_regular(p, max_bytes), None
            except BadSample as e:
                stats[e.reason] += 1
                yield key, None, None
        return
    members, walk = walk_tar(spec, max_bytes)
    stats.update(walk)
    if not members:
        return
    fd = os.open(spec, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        for key, comps in members:
            exts = {ext.lower(): (off, size) for ext, off, size in comps}
            yield key.replace("/", "_"), _member(fd, exts, image_member(exts), spec, key, stats, max_bytes), \
                _meta(fd, exts, spec, key, max_bytes)
    finally:
        os.close(fd)


def _member(fd, exts, ext, shard, key, stats, max_bytes):
    if ext is None:
        stats["missing_image"] += 1
        return None
    try:
        return pread_member(fd, *exts[ext], max_bytes, shard, key)
    except BadSample as e:
        stats[e.reason] += 1
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
