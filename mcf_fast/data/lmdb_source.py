"""LMDB images (optional; `pip install lmdb`): the "folder2lmdb" layout common to MoCo/MAE forks.

Layout read: an LMDB environment (a folder holding data.mdb, or a file opened with subdir=False)
with
- `__len__`: the sample count (ASCII digits or a pickled int); without it, the entry count minus meta keys;
- `__keys__` (optional): a pickled list of the sample keys (bytes or str), in sample order; without
  it, sample i is stored under the ASCII key `str(i)`;
- values: encoded image bytes, or a pickled tuple/list whose first item is the bytes (`(jpeg, label)`),
  or a pickled dict holding them under "image", "img" or "jpg". pyarrow-serialised values (old
  forks) are refused with a message: re-export them with pickle.

Pickles are untrusted: they are read by `safe_loads`, which first walks the opcodes without running
them (`mcf_fast.pickle_bounds`: a 719-byte shared-tuple key that would hash for ever, or a memo index
that makes the C unpickler allocate gigabytes, is refused there), then unpickles with an unpickler that
builds plain data only (bytes, str, numbers, bool, None, lists, tuples, dicts, sets) and refuses every
global, so a hostile database cannot run code. The one global allowed is `_codecs.encode(str, "latin1")`,
how protocol 2 (Python 2 era) pickles spell bytes; it is checked to do exactly that. A value whose
pickle needs anything else or is out of bounds is skipped and counted as `unsafe_pickle`; such meta
keys refuse the database with one line.
The environment is opened read-only, lock-free, once per process (LMDB handles do not survive fork).
"""
from __future__ import annotations

import io
import os
import pickle
from collections import Counter

from mcf_fast.pickle_bounds import RefusedFile
from mcf_fast.pickle_walk import check_untrusted

from .files import MAX_FILE_MB
from .reasons import BadSample
from .sampling import pseudo_counts

META_KEYS = (b"__len__", b"__keys__")


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for a callable, or is out of bounds: it is refused, never run."""


def _latin1_encode(obj, encoding="utf-8"):
    """Stand-in for `_codecs.encode` in protocol-2 pickles of bytes: str -> bytes, nothing else."""
    if not isinstance(obj, str) or encoding != "latin1":
        raise UnsafePickle("_codecs.encode is only allowed as protocol 2's bytes(str, 'latin1')")
    return obj.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickle(f"pickle references {module}.{name}: only plain data is read")


def safe_loads(data: bytes, source: str = "pickle"):
    """pickle.loads for untrusted bytes: bounded, plain containers and scalars only (see the module docstring)."""
    check_untrusted(data, source, UnsafePickle)
    return _PlainUnpickler(io.BytesIO(data)).load()


def is_lmdb(path: str) -> bool:
    return path.endswith(".lmdb") or os.path.exists(os.path.join(path, "data.mdb"))


def _meta(raw: bytes, what: str, path: str):
    try:
        return safe_loads(raw, what)
    except Exception as e:  # a hostile or damaged meta key: the database cannot be indexed
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise RefusedFile(f"{path}: {what} is not a plain pickle ({first}); rewrite it as a pickled list of "
                          "bytes keys / an int (see mcf_fast/data/lmdb_source.py)") from None


class LmdbSource:
    kind = "lmdb"

    def __init__(self, path: str, max_bytes: int = MAX_FILE_MB << 20):
        try:
            import lmdb  # noqa: F401
        except ImportError as e:
            raise ValueError(f"data.path={path!r} is an LMDB database but the lmdb package is missing "
                             "(pip install lmdb)") from e
        self.path, self.max_bytes = path, max_bytes
        self._env, self._pid = None, None
        with self._open().begin() as txn:
            raw = txn.get(b"__keys__")
            self._keys = self._read_keys(raw) if raw else None
            n = txn.get(b"__len__")
            if n is not None:
                digits = n.strip()
                if digits.isdigit() and len(digits) > 18:
                    raise RefusedFile(f"{path}: __len__ holds a {len(digits)}-digit number, not a sample count")
                n = int(digits) if digits.isdigit() else _meta(n, "__len__", path)
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise ValueError(f"{path}: __len__ holds {n!r}, not a sample count; store an int")
            elif self._keys is not None:
                n = len(self._keys)
            else:
                n = self._open().stat()["entries"] - sum(txn.get(k) is not None for k in META_KEYS)
        self.num_samples = int(n)
        self.counts = pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter()

    def _read_keys(self, raw: bytes) -> list[bytes]:
        keys = _meta(raw, "__keys__", self.path)
        if not isinstance(keys, (list, tuple)) or not all(isinstance(k, (bytes, str)) for k in keys):
            raise ValueError(f"{self.path}: __keys__ must be a pickled list of bytes or str keys, "
                             f"not {type(keys).__name__}")
        return [k if isinstance(k, bytes) else k.encode() for k in keys]

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            import lmdb
            self._env = lmdb.open(self.path, subdir=os.path.isdir(self.path), readonly=True, lock=False,
                                  readahead=False, meminit=False, max_readers=256)
            self._pid = os.getpid()
        return self._env

    def read(self, i: int):
        key = self._keys[i] if self._keys is not None else str(i).encode()
        with self._open().begin() as txn:
            val = txn.get(key)
        if val is None:
            raise BadSample("missing_image", f"{self.path}: no value under key {key!r}")
        if len(val) > self.max_bytes:
            raise BadSample("too_large", f"{key!r}: {len(val)} bytes > {self.max_bytes} (data.max_file_mb)")
        if val[:1] == b"\x80":  # pickle protocol >= 2
            val = self._unpickle_image(key, val)
        elif val[:6] == b"ARROW1" or val[:4] == b"\xff\xff\xff\xff":
            raise ValueError(f"{self.path}: values are pyarrow-serialised, which current pyarrow cannot "
                             "read; re-export the database with pickle (see mcf_fast/data/lmdb_source.py)")
        return val, key.decode(errors="replace")

    @staticmethod
    def _unpickle_image(key: bytes, val: bytes) -> bytes:
        try:
            obj = safe_loads(val, f"value {key!r}")
        except UnsafePickle as e:
            raise BadSample("unsafe_pickle", f"{key!r}: {e}") from None
        except Exception as e:  # a value that only looks like a pickle: treat as damaged
            raise BadSample("corrupt", f"{key!r}: unreadable pickle ({e})") from None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("image", "img", "jpg") if k in obj), None)
        elif isinstance(obj, (tuple, list)):
            obj = obj[0] if obj else None
        if not isinstance(obj, (bytes, bytearray)):
            raise BadSample("not_image", f"{key!r}: pickled value holds {type(obj).__name__}, not image bytes")
        return bytes(obj)
