"""Index files and the manifest: what makes a shard "validated".

- `SHARD.tar.idx`: DALI's webdataset index, version v1.2: first line "v1.2 N", then one line per
  sample: "ext offset size name" repeated for each member of the sample (offset = byte offset of the
  member's data inside the tar). `fn.readers.webdataset(index_paths=...)` reads these, and so do our
  readers (`sources.read_index`). Validated indexes list only samples whose image decodes.
- `manifest.json` in the shard folder: {"format": "mcf_fast.shards.v1", "shards": {NAME: {"samples":
  n, "size": tar bytes, "skipped_by_reason": {...}, "validated_by": "scan"|"prepare"|"synthetic"}},
  plus totals}. A shard is validated when its entry exists, its index exists and the tar size still
  matches (a rewritten shard is invalid again).
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict

from .sources import MANIFEST, split_key, write_index

__all__ = ["index_written_shard", "tar_members", "update_manifest", "write_index"]


def tar_members(path: str) -> list:
    """[(key, [(ext, data offset, size), ...])] in tar order (regular files only). Raises
    tarfile.TarError / OSError on an unreadable tar."""
    samples: OrderedDict[str, list] = OrderedDict()
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = split_key(m.name)
            if not key or key.endswith("/") or " " in m.name:
                continue  # DALI's index format is space-separated: such names cannot be indexed
            samples.setdefault(key, []).append((ext, m.offset_data, m.size))
    return list(samples.items())


def update_manifest(folder: str, entries: dict, **extra) -> dict:
    """Merge {shard name: entry} into folder/manifest.json (atomic rename) and refresh the totals."""
    p = os.path.join(folder, MANIFEST)
    man = {"format": "mcf_fast.shards.v1", "shards": {}}
    if os.path.exists(p):
        with open(p) as f:
            man = json.load(f)
    man.setdefault("shards", {}).update(entries)
    man.update(extra)
    totals: dict = {}
    for e in man["shards"].values():
        for r, n in e.get("skipped_by_reason", {}).items():
            totals[r] = totals.get(r, 0) + n
    man["samples"] = sum(e["samples"] for e in man["shards"].values())
    man["skipped_by_reason"] = totals
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)
    os.replace(tmp, p)
    return man


def index_written_shard(path: str, validated_by: str, skipped: dict | None = None) -> dict:
    """Index a shard we just wrote ourselves (every sample known good) and return its manifest entry."""
    members = tar_members(path)
    write_index(path + ".idx", members)
    return {"samples": len(members), "size": os.path.getsize(path), "skipped_by_reason": dict(skipped or {}),
            "validated_by": validated_by}
