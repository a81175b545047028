"""Where samples come from: synthetic faces, image folders / list files, webdataset tar shards
(and LMDB, in `lmdb_source`).

Every source is random-access by global sample id (0 .. num_samples-1) and exposes `counts` (samples
per shard or pseudo-shard) for `sampling.EpochOrder`, plus `index_stats` (problems found while
indexing: missing/empty shards). `read(i)` returns (payload, key) where the payload is encoded bytes,
or a decoded uint8 array for synthetic faces; it raises `decode.BadSample` for a sample without an
image ("missing_image") or a file that cannot be read ("unreadable_file").

Tar shards are read through DALI-format index files (`SHARD.idx`, "v1.2 N" then per sample
"ext offset size name ..." with offset = the member's data offset), the same files DALI's webdataset
reader uses, so no tar is walked at start-up and reads are one pread each. `prepare` and
`scan --write-index` write them, leaving bad samples out, and record the shard in `manifest.json`
next to it (that is what "validated" means). Without an index the torch loader walks the tar headers
itself (seeks over data, counted and logged) unless `require_validated` is set.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections import Counter, OrderedDict

import numpy as np

from .decode import BadSample

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MANIFEST = "manifest.json"
PSEUDO_SHARD = 4096  # folders/lists/synthetic: consecutive ids grouped like shards for the order


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the last component."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


class SyntheticSource:
    """Face i drawn from (seed, i) at the training size; drawn faces are cached up to a byte budget."""

    kind = "synthetic"

    def __init__(self, num: int, size: int, seed: int, cache_mb: int = 256):
        self.num_samples, self.size, self.seed = int(num), int(size), int(seed)
        self.counts = _pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter()
        self._cache: dict[int, np.ndarray] = {}
        self._cache_max = (cache_mb << 20) // (3 * size * size)

    def read(self, i: int):
        img = self._cache.get(i)
        if img is None:
            from .synthetic import draw_face
            img = draw_face(self.seed, i, self.size).image
            if len(self._cache) < self._cache_max:
                self._cache[i] = img
        return img, f"synthetic/{i:08d}"


class FileListSource:
    """Image files: a folder walked recursively (sorted, any depth) or a list file of paths."""

    kind = "files"

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.num_samples = len(paths)
        self.counts = _pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter()

    @classmethod
    def from_folder(cls, root: str) -> FileListSource:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
        if len(paths) > 1_000_000:
            log.warning("%s holds %d images: walking it took a while and repeats at every start; "
                        "pack it into shards with `python -m mcf_fast.data.prepare`", root, len(paths))
        return cls(paths)

    def read(self, i: int):
        p = self.paths[i]
        try:
            with open(p, "rb") as f:
                return f.read(), p
        except OSError as e:
            raise BadSample("unreadable_file", f"{p}: {e}") from None


class ShardSource:
    """Webdataset tar shards read through DALI-format index files (see the module docstring)."""

    kind = "shards"

    def __init__(self, shards: list[str], *, require_validated: bool = False):
        self.shards = shards
        self.index_stats: Counter = Counter()
        self.index_converted: Counter = Counter()  # conversions scan saw (DALI converts them itself)
        self.validated = [False] * len(shards)
        manifests: dict[str, dict] = {}
        counts = []
        for k, s in enumerate(shards):
            d = os.path.dirname(os.path.abspath(s))
            if d not in manifests:
                manifests[d] = read_manifest(d)
            entry = manifests[d].get("shards", {}).get(os.path.basename(s))
            if not os.path.exists(s):
                counts.append(0)
                if entry is not None and entry.get("empty"):  # prepare found no face in that unit
                    self.validated[k] = True
                    continue
                self.index_stats["missing_shard"] += 1
                log.warning("shard %s does not exist: skipped (counted as missing_shard)", s)
                continue
            idx = s + ".idx"
            if entry is not None and os.path.exists(idx) and entry.get("size") == os.path.getsize(s):
                self.validated[k] = True
                counts.append(int(entry["samples"]))
                if entry.get("validated_by") == "scan":  # bad samples inside these shards, left out
                    # (prepare's counts describe its raw input, e.g. no_face: not this data's problems)
                    for reason, n in entry.get("skipped_by_reason", {}).items():
                        self.index_stats[reason] += n
                self.index_converted.update(entry.get("converted_by_reason", {}))
            elif require_validated:
                raise ValueError(
                    f"shard {s} is not validated (no {idx} and matching entry in {os.path.join(d, MANIFEST)}); "
                    "run `python -m mcf_fast.data.scan --write-index SHARDS` (or build shards with "
                    "`python -m mcf_fast.data.prepare`), or set data.require_validated=false")
            else:
                counts.append(-1)  # filled lazily below
        self._index: OrderedDict[int, list] = OrderedDict()
        for k, c in enumerate(counts):
            if c < 0:  # unvalidated: walk the tar headers once, now (counts are needed up front)
                entries, stats = index_tar(shards[k])
                self.index_stats.update(stats)
                self._index[k] = entries
                counts[k] = len(entries)
        if self._index:
            log.warning("%d of %d shards are not validated: indexed their tars at start-up; run "
                        "`python -m mcf_fast.data.scan --write-index` once to skip this",
                        len(self._index), len(shards))
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.num_samples = int(self.counts.sum())
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    @property
    def all_validated(self) -> bool:
        return all(v or not os.path.exists(s) for v, s in zip(self.validated, self.shards))

    def _entries(self, k: int) -> list:
        e = self._index.get(k)
        if e is None:
            e = read_index(self.shards[k] + ".idx")
            self._index[k] = e
            while len(self._index) > 64:  # bounded memory on 20M-sample sets
                self._index.popitem(last=False)
        return e

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        while self.counts[k] == 0:  # empty shards share their start with the next one
            k += 1
        return k, int(i - self.starts[k])

    def entry(self, i: int):
        """(shard path, key, image offset, image size) of sample i, or size -1 when it has no image."""
        k, j = self.locate(i)
        key, off, size = self._entries(k)[j]
        return self.shards[k], key, off, size

    def read(self, i: int):
        if os.getpid() != self._pid:  # forked into a DataLoader worker: do not share file offsets
            self._fds, self._pid = OrderedDict(), os.getpid()
        k, j = self.locate(i)
        key, off, size = self._entries(k)[j]
        if size < 0:
            raise BadSample("missing_image", f"{self.shards[k]}: sample {key} has no image member")
        fd = self._fds.get(k)
        if fd is None:
            fd = os.open(self.shards[k], os.O_RDONLY)
            self._fds[k] = fd
            while len(self._fds) > 32:
                os.close(self._fds.popitem(last=False)[1])
        return os.pread(fd, size, off), key

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pseudo_counts(n: int) -> np.ndarray:
    c = [PSEUDO_SHARD] * (n // PSEUDO_SHARD) + ([n % PSEUDO_SHARD] if n % PSEUDO_SHARD else [])
    return np.asarray(c or [0], dtype=np.int64)


def image_member(exts: dict) -> str | None:
    """The image extension of a sample (first of IMAGE_EXTS present), or None."""
    for e in IMAGE_EXTS:
        if e in exts:
            return e
    return None


def index_tar(path: str) -> tuple[list, Counter]:
    """Walk a tar's headers: [(key, image offset, image size)] and a Counter of problems. Samples
    without an image are kept with size -1 so they are counted once per epoch as missing_image."""
    stats: Counter = Counter()
    samples: OrderedDict[str, dict] = OrderedDict()
    try:
        if os.path.getsize(path) == 0:
            stats["empty_shard"] += 1
            return [], stats
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = split_key(m.name)
                if not key or key.endswith("/"):
                    continue
                samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        stats["corrupt_shard"] += 1
        log.warning("shard %s cannot be read as a tar (%s): its readable part is used, rest counted", path, e)
    if not samples and not stats:
        stats["empty_shard"] += 1
    out = []
    for key, exts in samples.items():
        e = image_member(exts)
        out.append((key, *exts[e]) if e else (key, 0, -1))
    return out, stats


def write_index(path: str, entries) -> None:
    """DALI v1.2 index of `entries` = [(key, [(ext, offset, size), ...])] (atomic rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(entries)}\n")
        f.writelines(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, off, size in comps) + "\n" for key, comps in entries)
    os.replace(tmp, path)


def read_index(path: str) -> list:
    """[(key, image offset, image size)] from a DALI v1.2 index file."""
    with open(path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != "v1.2":
            raise ValueError(f"{path}: not a DALI v1.2 index file (first line {head!r}); "
                             "rewrite it with `python -m mcf_fast.data.scan --write-index`")
        out = []
        for line in f:
            tok = line.split()
            comps = {tok[i].lower(): (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok) - 3, 4)}
            e = image_member(comps)
            key = split_key(tok[3])[0] if tok else ""
            out.append((key, *comps[e]) if e else (key, 0, -1))
    return out


def read_manifest(folder: str) -> dict:
    p = os.path.join(folder, MANIFEST)
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def expand_shards(spec: str) -> list[str]:
    """Brace pattern ('faces-{000000..000099}.tar', via braceexpand), a single .tar, a folder of
    .tar files, or '::'-joined patterns."""
    import braceexpand
    out = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            out += sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            out += list(braceexpand.braceexpand(part))
    return out


def open_source(path: str, *, seed: int, img_size: int, synthetic_size: int, cache_mb: int,
                require_validated: bool = False):
    """Pick the source for `data.path` (see DataConfig.path)."""
    if path == "":
        return SyntheticSource(synthetic_size, img_size, seed, cache_mb)
    if path.startswith("pipe:") or "://" in path:
        raise ValueError(f"data.path={path!r}: remote/pipe shards need sequential streaming, which "
                         "breaks exact mid-epoch resume; copy the shards to a local or mounted path")
    from .lmdb_source import LmdbSource, is_lmdb
    if is_lmdb(path):
        return LmdbSource(path)
    if os.path.isdir(path):
        if glob.glob(os.path.join(path, "*.tar")):
            return ShardSource(expand_shards(path), require_validated=require_validated)
        src = FileListSource.from_folder(path)
        if src.num_samples == 0:
            raise ValueError(f"data.path={path!r}: folder holds no images ({', '.join(IMAGE_EXTS)}) and no .tar shards")
        return src
    if path.endswith((".txt", ".lst", ".list")) and os.path.isfile(path):
        base = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        lines = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        if lines and all(ln.endswith(".tar") for ln in lines):
            return ShardSource(lines, require_validated=require_validated)
        return FileListSource(lines)
    if ".tar" in path:
        shards = expand_shards(path)
        if not any(os.path.exists(s) for s in shards):
            raise ValueError(f"data.path={path!r}: none of its {len(shards)} shard(s) exist (first: {shards[0]})")
        return ShardSource(shards, require_validated=require_validated)
    raise ValueError(f"data.path={path!r} is not a folder, a .tar shard pattern or a list file (.txt); "
                     "use '' for synthetic faces")
