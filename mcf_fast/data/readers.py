"""The readers behind the data sources: synthetic faces, image files (a folder or a list file),
webdataset tar shards (LMDB's is `lmdb_source.LmdbSource`). Which reader a `--data.path` gets, and
the checks before it is built, are `sources.py`'s registry.

Every reader is random-access by global sample id (0 .. num_samples-1) and exposes `counts` (samples
per shard or pseudo-shard) for `sampling.EpochOrder`, plus `index_stats` (problems found while
indexing or walking: missing/empty shards, FIFOs, symlink loops). `read(i)` returns (payload, key)
where the payload is encoded bytes, or a decoded uint8 array for synthetic faces; it raises
`reasons.BadSample` naming why a sample is unusable ("missing_image", "unreadable_file",
"not_regular_file", "too_large", ...: one vocabulary, `reasons.SKIP`). Nothing is read without a
size check first: a member or file above `max_bytes` (data.max_file_mb) is never read.

Tar shards are read through DALI-format index files (`SHARD.idx`, "v1.2 N" then per sample
"ext offset size name ..." with offset = the member's data offset), the same files DALI's webdataset
reader uses, so no tar is walked at start-up and reads are one pread each. `prepare` and
`scan --write-index` write them, leaving bad samples out, and record the shard in `manifest.json`
next to it (that is what "validated" means). Without an index the torch loader walks the tar headers
itself (seeks over data, counted and logged) unless `require_validated` is set.
"""
from __future__ import annotations

import glob
import logging
import os
from collections import Counter, OrderedDict

import numpy as np

from .files import MAX_FILE_MB, pread_member, read_regular, walk_images
from .index import index_tar, read_index, shard_entry, validated_entry
from .probe import LIST_EXTS, is_regular, list_entries
from .reasons import BadSample
from .sampling import pseudo_counts

log = logging.getLogger(__name__)


class SyntheticSource:
    """Face i drawn from (seed, i) at the training size; drawn faces are cached up to a byte budget."""

    kind = "synthetic"

    def __init__(self, num: int, size: int, seed: int, cache_mb: int = 256):
        self.num_samples, self.size, self.seed = int(num), int(size), int(seed)
        self.counts = pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter()
        self._cache: dict[int, np.ndarray] = {}
        self._cache_max = (cache_mb << 20) // (3 * size * size)

    def read(self, i: int):
        img = self._cache.get(i)
        if img is None:
            from .faces import draw_face
            img = draw_face(self.seed, i, self.size).image
            if len(self._cache) < self._cache_max:
                self._cache[i] = img
        return img, f"synthetic/{i:08d}"


class FileListSource:
    """Image files: a folder walked recursively (sorted, any depth) or a list file of paths. Only
    regular files of at most `max_bytes` are read (see `files`); what the walk left out is counted."""

    kind = "files"

    def __init__(self, paths: list[str], max_bytes: int = MAX_FILE_MB << 20, index_stats: Counter | None = None):
        self.paths = paths
        self.num_samples = len(paths)
        self.counts = pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter(index_stats or {})
        self.max_bytes = max_bytes

    @classmethod
    def from_folder(cls, root: str, max_bytes: int = MAX_FILE_MB << 20) -> FileListSource:
        paths, stats = walk_images(root)
        if stats:
            log.warning("%s: left out while walking it: %s", root, dict(stats))
        if len(paths) > 1_000_000:
            log.warning("%s holds %d images: walking it took a while and repeats at every start; "
                        "pack it into shards with `python -m mcf_fast.data.prepare`", root, len(paths))
        return cls(paths, max_bytes, stats)

    @classmethod
    def from_list(cls, path: str, max_bytes: int = MAX_FILE_MB << 20) -> FileListSource:
        """The image paths of a UTF-8 list file (relative ones from the list file's folder)."""
        return cls(list_entries(path), max_bytes)

    def read(self, i: int):
        p = self.paths[i]
        return read_regular(p, self.max_bytes), p


class ShardSource:
    """Webdataset tar shards read through DALI-format index files (see the module docstring)."""

    kind = "shards"

    def __init__(self, shards: list[str], *, require_validated: bool = False, max_bytes: int = MAX_FILE_MB << 20):
        self.shards, self.max_bytes = shards, max_bytes
        self.index_stats: Counter = Counter()
        self.index_converted: Counter = Counter()  # conversions scan saw (DALI converts them itself)
        self.validated = [False] * len(shards)
        manifests: dict[str, dict] = {}
        counts = []
        for k, s in enumerate(shards):
            if not os.path.exists(s):
                counts.append(0)
                entry = shard_entry(s, manifests)
                if entry is not None and entry.get("empty"):  # prepare found no face in that unit
                    self.validated[k] = True
                    continue
                self.index_stats["missing_shard"] += 1
                log.warning("shard %s does not exist: skipped (counted as missing_shard)", s)
                continue
            entry = validated_entry(s, manifests)
            if entry is not None:
                self.validated[k] = True
                counts.append(int(entry["samples"]))
                if entry.get("validated_by") == "scan":  # bad samples inside these shards, left out
                    # (prepare's counts describe its raw input, e.g. no_face: not this data's problems)
                    for reason, n in entry.get("skipped_by_reason", {}).items():
                        self.index_stats[reason] += n
                self.index_converted.update(entry.get("converted_by_reason", {}))
            elif require_validated:
                raise ValueError(
                    f"shard {s} is not validated (no {s}.idx and matching entry in the manifest.json beside it); "
                    "run `python -m mcf_fast.data.scan --write-index SHARDS` (or build shards with "
                    "`python -m mcf_fast.data.prepare`), or set data.require_validated=false")
            else:
                counts.append(-1)  # filled lazily below
        self._index: OrderedDict[int, list] = OrderedDict()
        for k, c in enumerate(counts):
            if c < 0:  # unvalidated: walk the tar headers once, now (counts are needed up front)
                entries, stats = index_tar(shards[k], max_bytes)
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
            try:  # O_NONBLOCK: a shard swapped for a FIFO after indexing must not block a worker
                fd = os.open(self.shards[k], os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except OSError as e:
                raise BadSample("unreadable_file", f"{self.shards[k]}: {e}") from None
            self._fds[k] = fd
            while len(self._fds) > 32:
                os.close(self._fds.popitem(last=False)[1])
        return pread_member(fd, off, size, self.max_bytes, self.shards[k], key), key

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def expand_shards(spec: str) -> list[str]:
    """Brace pattern ('faces-{000000..000099}.tar', via braceexpand), a single .tar, a folder of
    .tar files, a list file of shard paths, or '::'-joined patterns."""
    import braceexpand
    out = []
    for part in spec.split("::"):
        if part.endswith(LIST_EXTS) and is_regular(part):
            out += list_entries(part)
        elif os.path.isdir(part):
            out += sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            out += list(braceexpand.braceexpand(part))
    return out
