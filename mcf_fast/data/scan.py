"""`python -m mcf_fast.data.scan PATH_OR_SHARDS`: decode everything once, report, optionally validate.

Reports sample counts, bad samples by reason (with examples), converted images (gray, CMYK, RGBA,
16-bit, palette: usable, both loaders convert them) and a histogram of the shorter image side.
Exit code 0 when nothing is bad, 1 otherwise (`--strict`: conversions count as bad too), 2 on usage
errors.

`--write-index` (shards only) writes each shard's DALI index `SHARD.tar.idx` listing only the samples
whose image decodes, and records the shard in `manifest.json` (see `index`): from then on both loaders
read exactly those samples and DALI accepts the shards. It is also the "small command for existing
shards" that turns img2dataset output into validated shards without rewriting them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from .decode import BadSample, decode_rgb, resolve_decoder
from .sources import image_member, write_index

BUCKETS = (0, 8, 32, 64, 128, 224, 256, 512, 1024)  # histogram of the shorter side: [b_i, b_i+1)
MAX_EXAMPLES = 20


def _bucket(side: int) -> str:
    lo = max(b for b in BUCKETS if side >= b)
    nxt = [b for b in BUCKETS if b > lo]
    return f"{lo}-{nxt[0] - 1}" if nxt else f">={lo}"


def _check(data, decoder, min_size, stats, where):
    """Decode one payload, update stats; return True when usable."""
    try:
        arr, note = decode_rgb(data, decoder, min_size)
    except BadSample as e:
        stats["skipped"][e.reason] += 1
        if len(stats["examples"]) < MAX_EXAMPLES:
            stats["examples"].append(f"{where}: {e}")
        return False
    if note:
        stats["converted"][note] += 1
    stats["sizes"][_bucket(min(arr.shape[:2]))] += 1
    stats["ok"] += 1
    return True


def _new_stats():
    return {"ok": 0, "skipped": Counter(), "converted": Counter(), "sizes": Counter(), "examples": []}


def scan_shard(path: str, decoder: str = "auto", min_size: int = 8, write: bool = False) -> dict:
    """Scan one tar shard; with `write`, write its index of good samples. Returns stats + manifest entry."""
    decoder = resolve_decoder(decoder)
    st = _new_stats()
    if not os.path.exists(path):
        st["skipped"]["missing_shard"] += 1
        st["examples"].append(f"{path}: missing_shard")
        return st
    good, samples = [], {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                dot = m.name.find(".", m.name.rfind("/") + 1)
                key, ext = (m.name, "") if dot < 0 else (m.name[:dot], m.name[dot + 1:])
                if " " in m.name:
                    st["skipped"]["bad_name"] += 1  # DALI's index format is space-separated
                    continue
                samples.setdefault(key, []).append((ext, m.offset_data, m.size, m))
            if not samples:
                st["skipped"]["empty_shard"] += 1
                st["examples"].append(f"{path}: empty_shard")
            for key, comps in samples.items():
                exts = {c[0].lower(): c for c in comps}
                e = image_member(exts)
                if e is None:
                    st["skipped"]["missing_image"] += 1
                    if len(st["examples"]) < MAX_EXAMPLES:
                        st["examples"].append(f"{path}:{key}: missing_image")
                    continue
                data = tf.extractfile(exts[e][3]).read()
                if _check(data, decoder, min_size, st, f"{path}:{key}"):
                    good.append((key, [(c[0], c[1], c[2]) for c in comps]))
    except (tarfile.TarError, OSError) as err:
        st["skipped"]["corrupt_shard"] += 1
        st["examples"].append(f"{path}: corrupt_shard ({err})")
    if write:
        write_index(path + ".idx", good)
        st["entry"] = {"samples": len(good), "size": os.path.getsize(path),
                       "skipped_by_reason": dict(st["skipped"]), "converted_by_reason": dict(st["converted"]),
                       "validated_by": "scan"}
    return st


def scan_files(paths: list[str], decoder: str = "auto", min_size: int = 8) -> dict:
    decoder = resolve_decoder(decoder)
    st = _new_stats()
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            st["skipped"]["unreadable_file"] += 1
            st["examples"].append(f"{p}: {e}")
            continue
        _check(data, decoder, min_size, st, p)
    return st


def _merge(total, st):
    total["ok"] += st["ok"]
    for k in ("skipped", "converted", "sizes"):
        total[k].update(st[k])
    total["examples"] += st["examples"][:MAX_EXAMPLES - len(total["examples"])]


def scan(spec: str, *, workers: int = 1, decoder: str = "auto", min_size: int = 8, write_index: bool = False,
         progress: bool = False) -> dict:
    """Scan shards (pattern / folder of tars / list of tars) or image files; returns the merged report."""
    from .index import update_manifest
    from .sources import FileListSource, ShardSource, expand_shards, open_source
    total = _new_stats()
    shards = None
    if ".tar" in spec and not os.path.isdir(spec) and not spec.endswith(".txt"):
        shards = expand_shards(spec)
    else:
        src = open_source(spec, seed=0, img_size=8, synthetic_size=1, cache_mb=0) if spec else None
        if isinstance(src, ShardSource):
            shards = src.shards
        elif isinstance(src, FileListSource):
            chunks = [src.paths[i:i + 256] for i in range(0, len(src.paths), 256)]
            with ProcessPoolExecutor(max(1, workers)) as ex:
                for st in ex.map(scan_files, chunks, [decoder] * len(chunks), [min_size] * len(chunks)):
                    _merge(total, st)
        else:
            raise ValueError("scan needs a folder, a list file or shards, not synthetic data ('')")
    if shards is not None:
        # units that prepare found faceless have a manifest record and, on purpose, no file
        from .sources import read_manifest
        mans: dict = {}
        def _empty(p):
            d = os.path.dirname(os.path.abspath(p))
            mans.setdefault(d, read_manifest(d))
            return not os.path.exists(p) and mans[d].get("shards", {}).get(os.path.basename(p), {}).get("empty")
        total["empty_by_prepare"] = sum(1 for p in shards if _empty(p))
        shards = [p for p in shards if not _empty(p)]
        entries = {}
        bar = _bar(len(shards), progress)
        with ProcessPoolExecutor(max(1, workers)) as ex:
            for path, st in zip(shards, ex.map(scan_shard, shards, [decoder] * len(shards),
                                               [min_size] * len(shards), [write_index] * len(shards))):
                _merge(total, st)
                if "entry" in st:
                    entries.setdefault(os.path.dirname(os.path.abspath(path)), {})[os.path.basename(path)] = st["entry"]
                bar.update(1)
        bar.close()
        for folder, ent in entries.items():
            update_manifest(folder, ent)
        total["shards"] = len(shards)
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
    ap.add_argument("--write-index", action="store_true", help="shards: write validated DALI indexes + manifest")
    ap.add_argument("--strict", action="store_true", help="count converted images (gray, CMYK, ...) as bad")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    try:
        rep = scan(a.path, workers=a.workers, decoder=a.decoder, min_size=a.min_size,
                   write_index=a.write_index, progress=True)
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
