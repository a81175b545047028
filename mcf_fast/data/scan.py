"""`python -m mcf_fast.data.scan PATH_OR_SHARDS`: decode everything once, report, optionally validate.

Reports sample counts, bad samples by reason (with examples), converted images (gray, CMYK, RGBA,
16-bit, palette: usable, both loaders convert them) and a histogram of the shorter image side.
Exit code 0 when nothing is bad, 1 otherwise (`--strict`: conversions count as bad too), 2 on usage
errors. Reasons are `reasons.SKIP`'s, the loader's and prepare's too; files are read through the same
guarded readers (regular files only, `--max-file-mb`, `--max-pixels` checked on the header), and a tar
cut mid-member is scanned (and indexed) up to the cut.

An LMDB database (`lmdb_source`) is scanned value by value the same way (its pickled values through the
bounded, code-free reader: `unsafe_pickle` when refused).

`--write-index` (shards only) writes each shard's DALI index `SHARD.tar.idx` listing only the samples
whose image decodes, and records the shard in `manifest.json` (see `index`): from then on both loaders
read exactly those samples and DALI accepts the shards. It is also the "small command for existing
shards" that turns img2dataset output into validated shards without rewriting them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from .decode import MAX_PIXELS, decode_rgb, resolve_decoder
from .files import MAX_FILE_MB, pread_member, read_regular
from .index import image_member, read_manifest, update_manifest, walk_tar, write_index
from .lmdb_source import LmdbSource, is_lmdb
from .reasons import BadSample
from .sources import FileListSource, ShardSource, expand_shards, open_source

BUCKETS = (0, 8, 32, 64, 128, 224, 256, 512, 1024)  # histogram of the shorter side: [b_i, b_i+1)
MAX_EXAMPLES = 20


def _bucket(side: int) -> str:
    lo = max(b for b in BUCKETS if side >= b)
    nxt = [b for b in BUCKETS if b > lo]
    return f"{lo}-{nxt[0] - 1}" if nxt else f">={lo}"


def _bad(stats, reason, example, n=1):
    stats["skipped"][reason] += n
    if len(stats["examples"]) < MAX_EXAMPLES:
        stats["examples"].append(example + (f" (x{n})" if n > 1 else ""))


def _check(data, decoder, min_size, max_pixels, stats, where):
    """Decode one payload, update stats; return True when usable."""
    try:
        arr, note = decode_rgb(data, decoder, min_size, max_pixels)
    except BadSample as e:
        _bad(stats, e.reason, f"{where}: {e}")
        return False
    if note:
        stats["converted"][note] += 1
    stats["sizes"][_bucket(min(arr.shape[:2]))] += 1
    stats["ok"] += 1
    return True


def _new_stats():
    return {"ok": 0, "skipped": Counter(), "converted": Counter(), "sizes": Counter(), "examples": []}


def scan_shard(path: str, decoder: str = "auto", min_size: int = 8, write: bool = False,
               max_bytes: int = MAX_FILE_MB << 20, max_pixels: int = MAX_PIXELS) -> dict:
    """Scan one tar shard; with `write`, write its index of good samples. Returns stats + manifest entry.
    Every member the tar walk can read is decoded, so a shard cut mid-member keeps its readable part."""
    decoder = resolve_decoder(decoder)
    st = _new_stats()
    members, walk = walk_tar(path, max_bytes)
    for reason, n in walk.items():
        _bad(st, reason, f"{path}: {reason}", n)
    if {"missing_shard", "not_regular_file", "unreadable_file"} & set(walk):
        return st  # nothing to index: the shard is not there as a file we read
    good = []
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)) if members else -1
    try:
        for key, comps in members:
            exts = {c[0].lower(): c for c in comps}
            e = image_member(exts)
            if e is None:
                _bad(st, "missing_image", f"{path}:{key}: missing_image")
                continue
            try:
                data = pread_member(fd, exts[e][1], exts[e][2], max_bytes, path, key)
            except BadSample as err:
                _bad(st, err.reason, f"{path}:{key}: {err}")
                continue
            if _check(data, decoder, min_size, max_pixels, st, f"{path}:{key}"):
                good.append((key, comps))
    finally:
        if fd >= 0:
            os.close(fd)
    if write:
        write_index(path + ".idx", good)
        st["entry"] = {"samples": len(good), "size": os.path.getsize(path),
                       "skipped_by_reason": dict(st["skipped"]), "converted_by_reason": dict(st["converted"]),
                       "validated_by": "scan"}
    return st


def scan_files(paths: list[str], decoder: str = "auto", min_size: int = 8, max_bytes: int = MAX_FILE_MB << 20,
               max_pixels: int = MAX_PIXELS) -> dict:
    decoder = resolve_decoder(decoder)
    st = _new_stats()
    for p in paths:
        try:
            data = read_regular(p, max_bytes)
        except BadSample as e:
            _bad(st, e.reason, f"{p}: {e}")
            continue
        _check(data, decoder, min_size, max_pixels, st, p)
    return st


_WORKER_LMDB: list = []  # the LMDB a scan worker process reads, opened once there (handles do not survive fork)


def _open_lmdb(path: str, max_bytes: int) -> None:
    _WORKER_LMDB[:] = [LmdbSource(path, max_bytes)]


def scan_lmdb_range(bounds: tuple, decoder: str = "auto", min_size: int = 8, max_pixels: int = MAX_PIXELS) -> dict:
    """Scan samples [start, stop) of the LMDB this worker opened (`_open_lmdb`)."""
    src, decoder, st = _WORKER_LMDB[0], resolve_decoder(decoder), _new_stats()
    for i in range(*bounds):
        try:
            data, key = src.read(i)
        except BadSample as e:
            _bad(st, e.reason, f"{src.path}[{i}]: {e}")
            continue
        _check(data, decoder, min_size, max_pixels, st, f"{src.path}:{key}")
    return st


def _scan_lmdb(spec: str, total: dict, workers: int, write_index: bool, max_bytes: int, **kw) -> None:
    if write_index:
        raise ValueError(f"--write-index writes DALI indexes of tar shards; {spec} is an LMDB database (scan it "
                         "without --write-index: the loader skips and counts its bad samples itself)")
    n = LmdbSource(spec, max_bytes).num_samples  # meta keys checked here: one line when refused
    ranges = [(i, min(i + 1024, n)) for i in range(0, n, 1024)]
    with ProcessPoolExecutor(max(1, workers), initializer=_open_lmdb, initargs=(spec, max_bytes)) as pool:
        for st in pool.map(functools.partial(scan_lmdb_range, **kw), ranges):
            _merge(total, st)


def _merge(total, st):
    total["ok"] += st["ok"]
    for k in ("skipped", "converted", "sizes"):
        total[k].update(st[k])
    total["examples"] += st["examples"][:MAX_EXAMPLES - len(total["examples"])]


def _scan_shards(shards, total, pool, job, progress):
    # units that prepare found faceless have a manifest record and, on purpose, no file
    mans: dict = {}

    def _empty(p):
        d = os.path.dirname(os.path.abspath(p))
        mans.setdefault(d, read_manifest(d))
        return not os.path.exists(p) and mans[d].get("shards", {}).get(os.path.basename(p), {}).get("empty")
    total["empty_by_prepare"] = sum(1 for p in shards if _empty(p))
    shards = [p for p in shards if not _empty(p)]
    entries = {}
    bar = _bar(len(shards), progress)
    for path, st in zip(shards, pool.map(job, shards)):
        _merge(total, st)
        if "entry" in st:
            entries.setdefault(os.path.dirname(os.path.abspath(path)), {})[os.path.basename(path)] = st["entry"]
        bar.update(1)
    bar.close()
    for folder, ent in entries.items():
        update_manifest(folder, ent)
    total["shards"] = len(shards)


def scan(spec: str, *, workers: int = 1, decoder: str = "auto", min_size: int = 8, write_index: bool = False,
         progress: bool = False, max_file_mb: int = MAX_FILE_MB, max_pixels: int = MAX_PIXELS) -> dict:
    """Scan shards (pattern / folder of tars / list of tars) or image files; returns the merged report."""
    max_bytes = max_file_mb << 20
    total = _new_stats()
    if spec and is_lmdb(spec):
        _scan_lmdb(spec, total, workers, write_index, max_bytes, decoder=decoder, min_size=min_size,
                   max_pixels=max_pixels)
        total["bad"] = int(sum(total["skipped"].values()))
        return total
    with ProcessPoolExecutor(max(1, workers)) as pool:
        if ".tar" in spec and not os.path.isdir(spec) and not spec.endswith(".txt"):
            shards = expand_shards(spec)
        else:
            src = open_source(spec, seed=0, img_size=8, synthetic_size=1, cache_mb=0, max_bytes=max_bytes) if spec \
                else None
            if not isinstance(src, (ShardSource, FileListSource)):
                raise ValueError("scan needs a folder, a list file, shards or an LMDB database; '' (synthetic "
                                 "faces) has nothing to scan")
            shards = src.shards if isinstance(src, ShardSource) else None
        if shards is not None:
            job = functools.partial(scan_shard, decoder=decoder, min_size=min_size, write=write_index,
                                    max_bytes=max_bytes, max_pixels=max_pixels)
            _scan_shards(shards, total, pool, job, progress)
        else:
            for reason, n in src.index_stats.items():  # what the folder walk left out (FIFOs, loops, ...)
                _bad(total, reason, f"{spec}: {reason}", n)
            chunks = [src.paths[i:i + 256] for i in range(0, len(src.paths), 256)]
            job = functools.partial(scan_files, decoder=decoder, min_size=min_size, max_bytes=max_bytes,
                                    max_pixels=max_pixels)
            for st in pool.map(job, chunks):
                _merge(total, st)
    total["bad"] = int(sum(total["skipped"].values()))
    return total


class _NoBar:
    def update(self, n): pass
    def close(self): pass


def _bar(n, on):
    if not on:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=n, unit="shard", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mcf_fast.data.scan", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="shard pattern ('x-{000000..000009}.tar'), folder, or list file")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--min-size", type=int, default=8, help="shorter sides below this are bad (too_small)")
    ap.add_argument("--decoder", default="auto")
    ap.add_argument("--max-file-mb", type=int, default=MAX_FILE_MB,
                    help="files / tar members above this many MiB are bad (too_large), never read")
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                    help="images whose header claims more pixels are bad (too_large), never decoded")
    ap.add_argument("--write-index", action="store_true", help="shards: write validated DALI indexes + manifest")
    ap.add_argument("--strict", action="store_true", help="count converted images (gray, CMYK, ...) as bad")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    try:
        if a.max_file_mb < 1 or a.max_pixels < 64:
            raise ValueError("need --max-file-mb >= 1 and --max-pixels >= 64")
        rep = scan(a.path, workers=a.workers, decoder=a.decoder, min_size=a.min_size,
                   write_index=a.write_index, progress=True, max_file_mb=a.max_file_mb, max_pixels=a.max_pixels)
    except ValueError as e:
        print(f"scan: {e}", file=sys.stderr)
        return 2
    out = {k: (dict(sorted(v.items())) if isinstance(v, Counter) else v) for k, v in rep.items()}
    print(f"usable samples: {rep['ok']}   bad: {rep['bad']}   converted: {sum(rep['converted'].values())}")
    for title, key in (("bad by reason", "skipped"), ("converted by kind", "converted"),
                       ("shorter side (px)", "sizes")):
        if rep[key]:
            print(f"{title}:")
            for k, v in sorted(rep[key].items(), key=lambda kv: (len(kv[0]), kv[0])):
                print(f"  {k:>14}: {v}")
    for ex in rep["examples"]:
        print(f"  e.g. {ex}")
    if a.write_index:
        print("wrote validated index files and manifest.json")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = rep["bad"] + (sum(rep["converted"].values()) if a.strict else 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
