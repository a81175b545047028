"""Kinds of data source, declared once: `SOURCES`, the registry every part of the code asks.

An entry is a `DataSource` subclass that owns everything about its kind:
  name        the registry key (`shards`, `folder`, `list`, `lmdb`, `synthetic`)
  summary     one line: what the data is
  recognised  how a `--data.path` names it (for --help and for the error about a path nobody knows)
  fields      the DataConfig fields it reads beyond `path` (shown in those fields' --help)
  dali        whether the DALI loader can read it (it then also offers `all_validated`)
  recognises(path)              cheap: a stat, a folder glob or a list file's first line
  precheck(cfg, need, option)   before anything is built or written: the path is the right kind of
                                file (never a FIFO or a device), holds images, and at least `need`
                                samples (one training step: batch x ranks); one-line ValueError
  build(cfg, seed)              the reader (`readers.py`): kind, num_samples, counts, index_stats,
                                read(i) -> (encoded bytes or uint8 HWC array, key)
`precheck` takes `need` because one step's size comes from the optimizer and the world size, not
from DataConfig, and `option` because prepare calls the same path `--input`. Paths are matched
against the entries in registration order; the first that recognises a path owns it.

Adding a source is one class and one `SOURCES.register(MySource)` line (tests/test_data_sources.py
trains from a toy one); the pre-flight checks (`check_data`), `open_data`, DALI's availability check
and DataConfig's --help all ask the registry. Imports nothing heavy (numpy at most): the pre-flight
checks run before torch is loaded.
"""
from __future__ import annotations

import importlib.util
import os
import re
from types import SimpleNamespace

from mcf_fast.registry import Registry

from .decode import IMAGE_EXTS
from .files import MAX_FILE_MB, walk_images
from .index import index_tar, validated_entry
from .lmdb_source import LmdbSource, is_lmdb
from .probe import LIST_EXTS, count_images, describe, first_list_entry, is_regular, list_entries, others_text
from .readers import FileListSource, ShardSource, SyntheticSource, expand_shards

__all__ = ["SOURCES", "DataSource", "FileListSource", "ShardSource", "SyntheticSource", "check_data",
           "expand_shards", "find_source", "open_data", "open_source", "paths_hint"]

SOURCES: Registry = Registry("data source", "--data.path")
_DECODE_FIELDS = ("max_file_mb", "max_pixels", "min_image_size", "decoder")


def fail(option: str, path, msg: str):
    raise ValueError(f"{option} {path!r}: {msg}")


def too_few(option: str, path, have: int, need: int, what: str = "images"):
    """The one line for data that cannot fill one training step."""
    fail(option, path, f"holds {have} {what}, fewer than one training step takes ({need} = --optim.batch_size "
                       "x ranks): use more data or a smaller --optim.batch_size")


class DataSource:
    """Base of the registry entries (see the module docstring); the defaults suit a kind DALI cannot read."""

    name = ""
    summary = ""
    recognised = ""
    fields: tuple[str, ...] = ()
    dali = False

    @classmethod
    def recognises(cls, path: str) -> bool:
        return False

    @classmethod
    def precheck(cls, cfg, need: int, option: str = "--data.path") -> None:
        """One-line ValueError when the data cannot serve one step of `need` samples."""

    @classmethod
    def build(cls, cfg, seed: int):
        raise NotImplementedError(f"data source {cls.name!r} has no builder")


@SOURCES.register
class Lmdb(DataSource):
    name = "lmdb"
    summary = "an LMDB database of encoded images (the folder2lmdb layout of MoCo/MAE forks)"
    recognised = "an LMDB database (a folder holding data.mdb, or a *.lmdb path)"
    fields = _DECODE_FIELDS

    @classmethod
    def recognises(cls, path):
        return bool(path) and is_lmdb(path)

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        path = cfg.path
        what = describe(path)
        if what == "missing":
            fail(option, path, f"does not exist (an LMDB database was expected): {paths_hint()}")
        if what not in ("a folder", "a regular file"):
            fail(option, path, f"is {what}, not an LMDB database")
        if importlib.util.find_spec("lmdb") is None:
            fail(option, path, "is an LMDB database, which needs the lmdb package: pip install lmdb")
        import lmdb
        try:
            env = lmdb.open(path, subdir=what == "a folder", readonly=True, lock=False)
            try:
                with env.begin() as txn:  # the meta keys are not samples; __len__ may say fewer
                    n = env.stat()["entries"] - sum(txn.get(k) is not None for k in (b"__len__", b"__keys__"))
            finally:
                env.close()
        except lmdb.Error as e:
            fail(option, path, f"is not a readable LMDB database ({e})")
        if n < need:
            too_few(option, path, n, need, "entries")

    @classmethod
    def build(cls, cfg, seed):
        return LmdbSource(cfg.path, cfg.max_file_mb << 20)


@SOURCES.register
class Shards(DataSource):
    name = "shards"
    summary = "webdataset tar shards (img2dataset's layout), read through DALI-format index files"
    recognised = ("webdataset shards (one .tar, a brace pattern like faces-{000000..000099}.tar, a folder "
                  "holding *.tar, or a list file of .tar paths)")
    fields = ("require_validated",) + _DECODE_FIELDS
    dali = True

    @classmethod
    def recognises(cls, path):
        if not path:
            return False
        if os.path.isdir(path):  # stops at the first .tar: a folder of 20M images is not listed whole
            try:
                with os.scandir(path) as it:
                    return any(e.name.endswith(".tar") for e in it)
            except OSError:
                return False
        first = first_list_entry(path)
        return first.endswith(".tar") if first is not None else ".tar" in path

    @classmethod
    def paths(cls, path: str, option: str) -> list[str]:
        if path.endswith(LIST_EXTS) and is_regular(path):
            shards = list_entries(path)
            other = next((s for s in shards if not s.endswith(".tar")), None)
            if other is not None:
                fail(option, path, f"lists .tar shards and other paths ({other!r}): list shards only, or "
                                   "image files only")
            return shards
        return expand_shards(path)

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        path = cfg.path
        m = re.search(r"\{(\d+)\.\.(\d+)\}", path)
        folder = os.path.dirname(path) or "."
        if m and not os.path.isdir(folder):
            fail(option, path, f"folder {folder!r} does not exist: {paths_hint()}")
        shards = cls.paths(path, option)
        present = [s for s in shards if os.path.lexists(s)]
        if not present:
            where = f" (none of its {len(shards)} shards; the first is {shards[0]!r})" if len(shards) > 1 else ""
            fail(option, path, f"does not exist{where}: {paths_hint()}")
        usable = [s for s in present if is_regular(s)]
        if not usable:
            which = "" if present[0] == path else f"{present[0]!r} "
            fail(option, path, f"{which}is {describe(present[0])}, not a tar shard")
        cls._enough(cfg, usable, need, option)

    @classmethod
    def _enough(cls, cfg, shards, need, option):
        """Count samples with an image: validated shards from their manifest, others by walking tar
        headers, stopping once one step's worth is found."""
        strict = cfg.require_validated or cfg.loader == "dali"  # then every shard must be validated
        total, unvalidated, manifests = 0, [], {}
        for s in shards:
            entry = validated_entry(s, manifests)
            if entry is None:
                unvalidated.append(s)
            else:
                total += entry["samples"]
            if total >= need and not strict:
                break
        if unvalidated and strict:
            fail(option, cfg.path, f"{len(unvalidated)} of its {len(shards)} shards are not validated (e.g. "
                                   f"{unvalidated[0]!r}): run `python -m mcf_fast.data.scan --write-index "
                                   "SHARDS` once, or build them with `python -m mcf_fast.data.prepare`")
        for s in unvalidated:
            if total >= need:
                break
            total += sum(1 for _, _, size in index_tar(s, cfg.max_file_mb << 20)[0] if size >= 0)
        if total == 0:
            fail(option, cfg.path, f"its {len(shards)} shard(s) hold no images ({', '.join(IMAGE_EXTS)} members)")
        if total < need:
            too_few(option, cfg.path, total, need)

    @classmethod
    def build(cls, cfg, seed):
        return ShardSource(cls.paths(cfg.path, "--data.path"), max_bytes=cfg.max_file_mb << 20,
                           require_validated=cfg.require_validated or cfg.loader == "dali")


@SOURCES.register
class ImageList(DataSource):
    name = "list"
    summary = "image files named in a list file"
    recognised = "a list file (*.txt, *.lst, *.list) of image paths, one per line"
    fields = _DECODE_FIELDS
    PROBE = 8  # listed files looked at: if none of them exists the paths are surely wrong

    @classmethod
    def recognises(cls, path):
        return path.endswith(LIST_EXTS)

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        path = cfg.path
        what = describe(path)
        if what != "a regular file":
            fail(option, path, f"{'does not exist' if what == 'missing' else 'is ' + what}: a list file "
                               f"is a UTF-8 text file of image paths, one per line")
        try:
            entries = list_entries(path, max(need, cls.PROBE))
        except (OSError, ValueError) as e:
            fail(option, path, str(e))
        if not entries:
            fail(option, path, "lists no files (blank lines and # comments are skipped)")
        if not any(os.path.exists(p) for p in entries[:cls.PROBE]):
            fail(option, path, f"none of the first {min(len(entries), cls.PROBE)} listed files exist (e.g. "
                               f"{entries[0]!r}; relative paths are read from the list file's folder)")
        if len(entries) < need:
            too_few(option, path, len(entries), need, "paths")

    @classmethod
    def build(cls, cfg, seed):
        return FileListSource.from_list(cfg.path, cfg.max_file_mb << 20)


@SOURCES.register
class ImageFolder(DataSource):
    name = "folder"
    summary = "image files in a folder, any depth"
    recognised = "a folder of images (any depth)"
    fields = _DECODE_FIELDS

    @classmethod
    def recognises(cls, path):
        return bool(path) and os.path.isdir(path)

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        n, exact, others = count_images(cfg.path, need)
        if n < need and not exact:  # symlinked folders or unlistable ones: the loader's walk decides
            n = len(walk_images(cfg.path)[0])
        if n == 0:
            fail(option, cfg.path, f"is a folder with no images ({', '.join(IMAGE_EXTS)}) and no .tar "
                                   f"shards{others_text(others)}")
        if n < need:
            too_few(option, cfg.path, n, need)

    @classmethod
    def build(cls, cfg, seed):
        src = FileListSource.from_folder(cfg.path, cfg.max_file_mb << 20)
        if src.num_samples == 0:  # the folder changed since its precheck
            fail("--data.path", cfg.path, f"is a folder with no images ({', '.join(IMAGE_EXTS)})")
        return src


@SOURCES.register
class Synthetic(DataSource):
    name = "synthetic"
    summary = "synthetic faces drawn in memory from (seed, index) (the demo)"
    recognised = "'' for synthetic faces drawn in memory"
    fields = ("synthetic_size", "synthetic_cache_mb")

    @classmethod
    def recognises(cls, path):
        return path == ""

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        if need > cfg.synthetic_size:
            fail("--data.synthetic_size", cfg.synthetic_size,
                 f"one training step takes {need} images (--optim.batch_size x ranks): raise "
                 "--data.synthetic_size or lower --optim.batch_size")

    @classmethod
    def build(cls, cfg, seed):
        return SyntheticSource(cfg.synthetic_size, cfg.img_size, seed, cfg.synthetic_cache_mb)


# ----------------------------------------------------------------------------------- asking the registry
def paths_hint() -> str:
    """What a `--data.path` may be, from every registered kind."""
    names = [e.recognised for e in SOURCES if e.recognised]
    return "give " + "; ".join(names[:-1]) + ("; or " if len(names) > 1 else "") + names[-1]


def find_source(path, option: str = "--data.path") -> type[DataSource]:
    """The entry that owns `path` (the first, in registration order, that recognises it)."""
    if not isinstance(path, str):
        fail(option, path, f"must be a string: {paths_hint()}")
    if path.startswith("pipe:") or "://" in path:
        fail(option, path, "remote/pipe shards need sequential streaming, which breaks exact mid-epoch "
                           "resume; copy the shards to a local or mounted path")
    for entry in SOURCES:
        if entry.recognises(path):
            return entry
    what = describe(path)
    fail(option, path, f"{'does not exist' if what == 'missing' else 'is ' + what + ', not a data source'}: "
                       f"{paths_hint()}")


def check_data(cfg, need: int = 1, option: str = "--data.path") -> type[DataSource]:
    """Every check of the data settings that needs no build: the owning entry's precheck for one step
    of `need` samples, and the DALI loader's needs. Returns the entry; raises a one-line ValueError."""
    entry = find_source(cfg.path, option)
    if cfg.loader == "dali":
        if not entry.dali:
            readable = ", ".join(e.name for e in SOURCES if e.dali)
            fail("--data.loader", "dali", f"DALI reads {readable} only, and {option} {cfg.path!r} is "
                                          f"{entry.summary}: use --data.loader torch (or auto), or give shards")
        if not dali_installed():
            fail("--data.loader", "dali", "NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 "
                                          "(the [dali] extra), or use --data.loader torch")
    entry.precheck(cfg, need, option)
    return entry


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def open_data(cfg, seed: int = 0, option: str = "--data.path", need: int = 1):
    """The reader for `cfg.path`, checked first (`check_data` for `need` samples); its `kind` names the
    entry that built it."""
    entry = check_data(cfg, need, option)
    src = entry.build(cfg, seed)
    src.kind = entry.name
    return src


def open_source(path: str, *, seed: int = 0, img_size: int = 8, synthetic_size: int = 1, cache_mb: int = 0,
                require_validated: bool = False, max_bytes: int = MAX_FILE_MB << 20, option: str = "--data.path"):
    """The keyword form of `open_data` that scan and older callers use (no DataConfig needed; `option`
    is what the caller's errors call the path)."""
    cfg = SimpleNamespace(path=path, img_size=img_size, synthetic_size=synthetic_size, synthetic_cache_mb=cache_mb,
                          require_validated=require_validated, loader="torch", max_file_mb=max(1, max_bytes >> 20))
    return open_data(cfg, seed, option)


def field_note(field: str) -> str:
    """' [sources: a, b]' for a DataConfig field only some kinds read ('' for the others)."""
    users = [e.name for e in SOURCES if field in e.fields]
    return f" [read by the {', '.join(users)} source{'s' if len(users) > 1 else ''}]" if users else ""


def dali_readable() -> str:
    return ", ".join(e.name for e in SOURCES if e.dali) or "none"
