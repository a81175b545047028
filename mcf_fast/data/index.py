"""Tar walking, index files and the manifest: what makes a shard "validated".

- `walk_tar(path)`: the one walk of a tar's headers every tool uses (loader, scan, prepare), so they
  agree on which samples a shard holds. It keeps every member it can read up to the point where a
  tar is cut or damaged, and counts (by `reasons.SKIP` names) what it leaves out: names DALI's index
  cannot hold (whitespace, control characters), members above the size cap, a member cut by the end
  of the file, a shard that is empty or not a regular file.
- `SHARD.tar.idx`: DALI's webdataset index, version v1.2: first line "v1.2 N", then one line per
  sample: "ext offset size name" repeated for each member of the sample (offset = byte offset of the
  member's data inside the tar). `fn.readers.webdataset(index_paths=...)` reads these, and so do our
  readers (`read_index`). Validated indexes list only samples whose image decodes.
- `manifest.json` in the shard folder: {"format": "mcf_fast.shards.v1", "shards": {NAME: {"samples":
  n, "size": tar bytes, "skipped_by_reason": {...}, "validated_by": "scan"|"prepare"|"synthetic"}},
  plus totals}. A shard is validated when its entry exists, its index exists and the tar size still
  matches (a rewritten shard is invalid again).
"""
from __future__ import annotations

import json
import os
import stat
import tarfile
from collections import Counter, OrderedDict

from .decode import IMAGE_EXTS
from .files import MAX_FILE_MB

__all__ = ["MANIFEST", "image_member", "index_tar", "index_written_shard", "read_index", "read_manifest",
           "shard_entry", "split_key", "tar_members", "update_manifest", "validated_entry", "walk_tar",
           "write_index"]

MANIFEST = "manifest.json"


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the last component."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def bad_name(name: str) -> bool:
    """True for names DALI's space- and line-separated index cannot hold."""
    return not name.isprintable() or any(c.isspace() for c in name)


def image_member(exts: dict) -> str | None:
    """The image extension of a sample (first of IMAGE_EXTS present), or None."""
    for e in IMAGE_EXTS:
        if e in exts:
            return e
    return None


class _Bounded:
    """A file for tarfile whose reads never ask for more than the file holds, nor more than 16 MiB:
    a GNU long-name or pax header claiming 60 GiB makes tarfile call read(60 GiB), which allocates
    before reading. Walking headers, tarfile reads only headers (512 B, long names, pax records); a
    short read makes it raise ReadError, counted as corrupt_shard."""

    CAP = 16 << 20

    def __init__(self, f, end: int):
        self.f, self.end = f, end

    def read(self, n: int = -1) -> bytes:
        left = min(max(0, self.end - self.f.tell()), self.CAP)
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


def _open_regular(path: str, stats: Counter):
    """A binary file object of a regular, non-empty shard, or None with the reason counted."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block us
    except OSError:
        stats["missing_shard" if not os.path.lexists(path) else "unreadable_file"] += 1
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        stats["not_regular_file" if not stat.S_ISREG(st.st_mode) else "empty_shard"] += 1
        return None
    return os.fdopen(fd, "rb")


def walk_tar(path: str, max_bytes: int = MAX_FILE_MB << 20) -> tuple[list, Counter]:
    """[(key, [(ext, data offset, size), ...])] in tar order, and a Counter of what was left out."""
    stats: Counter = Counter()
    samples: OrderedDict[str, list] = OrderedDict()
    f = _open_regular(path, stats)
    if f is None:
        return [], stats
    with f:
        end = os.fstat(f.fileno()).st_size
        dropped = set()
        try:
            with tarfile.open(fileobj=_Bounded(f, end), mode="r:") as tf:
                for m in tf:
                    tf.members.clear()  # tarfile keeps every header otherwise: memory grows with the shard
                    if not m.isreg():
                        continue
                    key, ext = split_key(m.name)
                    if not key or key.endswith("/"):
                        continue
                    if bad_name(m.name):
                        stats["bad_name"] += 1
                        continue
                    if m.size > max_bytes:
                        stats["too_large"] += 1
                        dropped.add(key)  # the whole sample goes: counted once, not again as missing_image
                        continue
                    if m.offset_data + m.size > end:
                        stats["corrupt_shard"] += 1  # cut by the end of the file: the members before it stay
                        dropped.add(key)
                        break
                    samples.setdefault(key, []).append((ext, m.offset_data, m.size))
        except (tarfile.TarError, OSError):
            stats["corrupt_shard"] = 1  # once per shard, however it broke
    for k in dropped:
        samples.pop(k, None)
    if not samples and not stats:
        stats["empty_shard"] += 1
    return list(samples.items()), stats


def index_tar(path: str, max_bytes: int = MAX_FILE_MB << 20) -> tuple[list, Counter]:
    """The loader's view of an unvalidated tar: [(key, image offset, image size)] and the problems.
    Samples without an image are kept with size -1 so they are counted once per epoch as missing_image."""
    members, stats = walk_tar(path, max_bytes)
    out = []
    for key, comps in members:
        exts = {ext.lower(): (off, size) for ext, off, size in comps}
        e = image_member(exts)
        out.append((key, *exts[e]) if e else (key, 0, -1))
    return out, stats


def tar_members(path: str) -> list:
    """[(key, [(ext, data offset, size), ...])] of a tar we wrote ourselves (see walk_tar)."""
    return walk_tar(path, 1 << 62)[0]


def write_index(path: str, entries) -> None:
    """DALI v1.2 index of `entries` = [(key, [(ext, offset, size), ...])] (atomic rename)."""
    lines = []
    for key, comps in entries:
        names = [f"{key}.{ext}" for ext, _, _ in comps]
        if any(bad_name(n) for n in names):  # walk_tar leaves these out; a caller that did not is a bug
            raise ValueError(f"{path}: member name {names!r} cannot be indexed (whitespace or control characters)")
        lines.append(" ".join(f"{ext} {off} {size} {n}" for (ext, off, size), n in zip(comps, names)) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(lines)}\n")
        f.writelines(lines)
    os.replace(tmp, path)


def read_index(path: str) -> list:
    """[(key, image offset, image size)] from a DALI v1.2 index file."""
    fix = "rewrite it with `python -m mcf_fast.data.scan --write-index`"
    with open(path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
            raise ValueError(f"{path}: not a DALI v1.2 index file (first line {head!r}); {fix}")
        out = []
        for n, line in enumerate(f, 2):
            tok = line.split()
            try:
                comps = {tok[i].lower(): (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok) - 3, 4)}
            except ValueError:
                raise ValueError(f"{path}: line {n} is not 'ext offset size name ...'; {fix}") from None
            e = image_member(comps)
            key = split_key(tok[3])[0] if len(tok) > 3 else ""
            out.append((key, *comps[e]) if e else (key, 0, -1))
    if len(out) != int(head[1]):
        raise ValueError(f"{path}: header says {head[1]} samples but the file lists {len(out)}; {fix}")
    return out


def _counts_ok(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in d.items())


def _entry_ok(e) -> bool:
    return (isinstance(e, dict) and type(e.get("samples")) is int and e["samples"] >= 0
            and type(e.get("size", 0)) is int and _counts_ok(e.get("skipped_by_reason", {}))
            and _counts_ok(e.get("converted_by_reason", {})))


def read_manifest(folder: str) -> dict:
    """folder/manifest.json, checked: a manifest the readers would trip over later is refused now."""
    p = os.path.join(folder, MANIFEST)
    if not os.path.exists(p):
        return {}
    fix = "delete it and rerun `python -m mcf_fast.data.scan --write-index` (or prepare)"
    try:
        with open(p) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: unreadable manifest ({e}); {fix}") from None
    shards = man.get("shards", {}) if isinstance(man, dict) else None
    bad = [k for k, e in shards.items() if not _entry_ok(e)][:3] if isinstance(shards, dict) else ["(all)"]
    if bad:
        raise ValueError(f"{p}: malformed manifest entries {bad} (need int samples/size and int counts); {fix}")
    return man


def shard_entry(path: str, manifests: dict) -> dict | None:
    """The entry of shard `path` in the manifest.json beside it, or None; `manifests` caches each
    folder's manifest (read and checked once per folder)."""
    d = os.path.dirname(os.path.abspath(path))
    if d not in manifests:
        manifests[d] = read_manifest(d)
    return manifests[d].get("shards", {}).get(os.path.basename(path))


def validated_entry(path: str, manifests: dict) -> dict | None:
    """The manifest entry of `path` when the shard is validated: listed, its index beside it, and its
    size still the recorded one (a rewritten shard is not validated any more); else None."""
    entry = shard_entry(path, manifests)
    if entry is None or not os.path.exists(path + ".idx"):
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    return entry if entry.get("size") == size else None


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
