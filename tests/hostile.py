"""Builders of small hostile files (each under 2 KB unless said), shared by the bounded-reading tests and
by the memory probe `hostile_probe.py`. Nothing here is a test."""
from __future__ import annotations

import io
import pickle
import struct
import zipfile

import numpy as np


def shared_tuple_bomb(levels: int = 64) -> bytes:
    """{T(levels): 1} with T(0) = () and T(i+1) = (T(i), T(i)) shared through the memo: no global, so every
    allow-list passes it, and inserting the key hashes 2^levels tuples. Only opcodes torch's weights-only
    unpickler also reads (no POP, no MEMOIZE), so it reaches every reader."""
    out = b"\x80\x02}" + b")q\x00"  # the dict; T0 = () stored as memo entry 0
    for i in range(levels):
        out += b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])  # T(i+1) = (T(i) on the stack, T(i) fetched)
    return out + b"K\x01s."  # {T(levels): 1}


def shared_box(levels: int = 19) -> bytes:
    """{1: (T(levels),)}, T(0) a box (0, 0, 0, 0) and T(i+1) = (T(i), T(i), T(i)): 200 bytes that np.asarray
    turns into 3^19 x 4 floats (37 GB)."""
    out = b"\x80\x02}K\x01" + b"(K\x00K\x00K\x00K\x00tq\x00"
    for i in range(levels):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x87q" + bytes([i + 1])
    return out + b"\x85s."


def memo_jump() -> bytes:
    """9 bytes: LONG_BINPUT 2^30 makes CPython's C unpickler size its memo table to 2^31 pointers (16 GB)."""
    return b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 30) + b"."


def numpy_subarray_scalar(n: int = 1 << 27) -> bytes:
    """numpy scalar(dtype(('f8', (n,)))) with no data: numpy zero-fills 8n bytes (1 GB for n = 2^27)."""
    dtype = pickle.dumps(np.dtype(("f8", (n,))), protocol=2)[2:-1]  # its REDUCE + BUILD, without PROTO/STOP
    return b"\x80\x02cnumpy._core.multiarray\nscalar\n" + dtype + b"\x85R."


def object_array(n: int = 1 << 28) -> bytes:
    """An object-dtype ndarray of shape (n,) whose state carries no items (numpy 2.4 crashed on it)."""
    arr = pickle.dumps(np.array([None, None], dtype=object), protocol=2)
    return arr.replace(b"K\x02\x85", b"J" + struct.pack("<i", n) + b"\x85", 1)


def deep_list(depth: int = 1000) -> bytes:
    """[[[...]]] nested `depth` times: 2 bytes a level, RecursionError in every recursive consumer."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def grow_after_share(levels: int = 15, items: int = 900) -> bytes:
    """(T(levels), L): an empty list L shared 2^levels times through a tuple tree (counted small while L is
    empty), then filled with `items` numbers: 2^levels x items elements (29 M) for anything walking it."""
    out = b"\x80\x02]q\x00"  # L = [] as memo 0, T(0) = L
    for i in range(levels):
        out += b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])  # T(i+1) = (T(i), T(i))
    return out + b"h\x00(" + b"K\x01" * items + b"e\x86."  # fetch L, APPENDS the items, pair it with the tree


def torch_zip(pkl: bytes, prefix: str = "archive") -> bytes:
    """A torch zip checkpoint whose data.pkl is `pkl` (stored, as torch.save writes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        z.writestr(f"{prefix}/version", "3\n")
    return buf.getvalue()


def deflated_torch_zip(nbytes: int = 1 << 28) -> bytes:
    """A torch zip of one float storage whose record is deflated: ~260 KB that inflate to `nbytes`."""
    import torch
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            data = bytes(nbytes) if name.endswith("data/0") else src.read(name)
            z.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


HOSTILE_PICKLES = {"shared-tuple bomb": shared_tuple_bomb(), "memo jump": memo_jump(),
                   "numpy sub-array scalar": numpy_subarray_scalar(), "object array": object_array(),
                   "deep list": deep_list(), "grow after share": grow_after_share()}


def box_json_cases() -> dict:
    """Box files that are JSON but not boxes: deep nesting, a 5000-digit number, a record that is a number."""
    return {"deep.json": deep_json(), "huge.json": '{"a": [[1, 2, 3, ' + "9" * 5000 + "]]}", "five.jsonl": "5\n"}
