"""LMDB images (optional; `pip install lmdb`): the "folder2lmdb" layout common to MoCo/MAE forks.

Layout read: an LMDB environment (a folder holding data.mdb, or a file opened with subdir=False)
with
- `__len__`: the sample count (pickled int or ASCII digits); without it, the entry count minus meta keys;
- `__keys__` (optional): a pickled list of the sample keys, in sample order; without it, sample i is
  stored under the ASCII key `str(i)`;
- values: encoded image bytes, or a pickled tuple/list whose first item is the bytes (`(jpeg, label)`),
  or a pickled dict holding them under "image", "img" or "jpg". pyarrow-serialised values (old
  forks) are refused with a message: re-export them with pickle.
The environment is opened read-only, lock-free, once per process (LMDB handles do not survive fork).
"""
from __future__ import annotations

import os
import pickle
from collections import Counter

from .decode import BadSample
from .sources import _pseudo_counts

META_KEYS = (b"__len__", b"__keys__")


def is_lmdb(path: str) -> bool:
    return path.endswith(".lmdb") or os.path.exists(os.path.join(path, "data.mdb"))


class LmdbSource:
    kind = "lmdb"

    def __init__(self, path: str):
        try:
            import lmdb  # noqa: F401
        except ImportError as e:
            raise ValueError(f"data.path={path!r} is an LMDB database but the lmdb package is missing "
                             "(pip install lmdb)") from e
        self.path = path
        self._env, self._pid = None, None
        with self._open().begin() as txn:
            raw = txn.get(b"__keys__")
            self._keys = [k if isinstance(k, bytes) else str(k).encode() for k in pickle.loads(raw)] if raw else None
            n = txn.get(b"__len__")
            if n is not None:
                n = int(n) if n.strip().isdigit() else int(pickle.loads(n))
            elif self._keys is not None:
                n = len(self._keys)
            else:
                n = self._open().stat()["entries"] - sum(txn.get(k) is not None for k in META_KEYS)
        self.num_samples = int(n)
        self.counts = _pseudo_counts(self.num_samples)
        self.index_stats: Counter = Counter()

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
        if val[:1] == b"\x80":  # pickle protocol >= 2
            try:
                obj = pickle.loads(val)
            except Exception as e:  # a value that only looks like a pickle: treat as damaged
                raise BadSample("corrupt", f"{key!r}: unreadable pickle ({e})") from None
            if isinstance(obj, dict):
                obj = next((obj[k] for k in ("image", "img", "jpg") if k in obj), None)
            elif isinstance(obj, (tuple, list)):
                obj = obj[0] if obj else None
            if not isinstance(obj, (bytes, bytearray)):
                raise BadSample("not_image", f"{key!r}: pickled value holds {type(obj).__name__}, not image bytes")
            val = bytes(obj)
        elif val[:6] == b"ARROW1" or val[:4] == b"\xff\xff\xff\xff":
            raise ValueError(f"{self.path}: values are pyarrow-serialised, which current pyarrow cannot "
                             "read; re-export the database with pickle (see mcf_fast/data/lmdb_source.py)")
        return val, key.decode(errors="replace")
