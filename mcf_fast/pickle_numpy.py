"""What building numpy objects from a pickle may cost: checked on the walk's stand-in nodes.

numpy rebuilds a scalar from `scalar(dtype, data)` and an array from `_reconstruct` + `__setstate__`.
Both trust the dtype: a sub-array dtype `('f8', (N,))` makes `scalar(dtype)` zero-fill 8N bytes from a
few bytes of pickle, an object array's state with a large shape and no items crashed numpy 2.4 outright
(a segmentation fault, tried here), and a shape is only compared with the data after allocation in
some versions. So: plain number and string dtypes only, items of at most NUMPY_MAX_ITEMSIZE bytes,
no sub-arrays or fields, and an array's shape may not need more bytes than its data carries.
`w` is a `pickle_bounds.Walk` (only its `refuse` is used); nodes are its stand-ins.
"""
from __future__ import annotations

import re

# An element (or a scalar) of at most this many bytes: numbers are <= 32 bytes, 'U256' is 1 KiB. It also
# bounds what a scalar built without data zero-fills.
NUMPY_MAX_ITEMSIZE = 1024
# numpy / torch shapes: numpy allows 64 dimensions, real tensors use under 8.
MAX_DIMS = 32
_NUMPY_DTYPE = {"numpy.dtype"}
_NUMPY_SCALAR = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_NUMPY_ARRAY = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
_ENCODE = "_codecs.encode"
_TYPESTR = re.compile(r"^[<>|=]?([a-zA-Z])(\d*)$")
_NUMPY_KINDS = set("biufcUSaMme?")  # bool, ints, floats, complex, strings, datetimes: no objects, no void


def _dtype_itemsize(w, args) -> int:
    """The item size of `numpy.dtype(typestr, ...)`; object and void (raw, sub-array) dtypes are refused."""
    first = args.items[0] if args.kind == "tuple" and args.items else None
    m = _TYPESTR.match(first.value) if first is not None and isinstance(first.value, str) else None
    if m is None or m.group(1) not in _NUMPY_KINDS:
        w.refuse(f"a numpy dtype {getattr(first, 'value', None)!r} that is not a plain number or string type "
                 "(object and void dtypes can build anything or allocate at will)")
    size = int(m.group(2) or 1) * (4 if m.group(1) == "U" else 1)
    if size > NUMPY_MAX_ITEMSIZE:
        w.refuse(f"a numpy dtype of {size}-byte items (at most {NUMPY_MAX_ITEMSIZE})")
    return size


def _check_dtype_state(w, state) -> None:
    items = state.items if state.kind == "tuple" else None
    if not items or len(items) < 6:
        w.refuse("a numpy dtype whose state is not numpy's 8-field tuple")
    if items[2].kind != "none":
        w.refuse("a numpy dtype with a sub-array shape (a scalar of it zero-fills the whole shape)")
    if items[3].kind != "none":
        w.refuse("a structured numpy dtype (named fields)")
    elsize = items[5].value
    if not isinstance(elsize, int) or elsize > NUMPY_MAX_ITEMSIZE:
        w.refuse(f"a numpy dtype of {elsize!r}-byte items (at most {NUMPY_MAX_ITEMSIZE})")


def _data_bytes(node) -> int | None:
    """Upper bound of the bytes a node holds: a bytes object, or `_codecs.encode(str, 'latin1')`."""
    if node.kind == "bytes":
        return node.items
    if node.kind == "call" and node.value == _ENCODE and node.items.items:
        return node.items.items[0].items if node.items.items[0].kind == "str" else None
    return None


def _dtype_of(w, node) -> int:
    if node.kind != "call" or node.value not in _NUMPY_DTYPE or node.info is None:
        w.refuse("a numpy scalar or array whose dtype is not a plain numpy.dtype")
    return node.info


def _check_scalar(w, args) -> None:
    items = args.items if args.kind == "tuple" else None
    if not items:
        w.refuse("a numpy scalar without a dtype")
    _dtype_of(w, items[0])
    if len(items) > 1 and (_data_bytes(items[1]) or 0) > NUMPY_MAX_ITEMSIZE:
        w.refuse("a numpy scalar with more data than one item")


def _check_array_state(w, state) -> None:
    items = state.items if state.kind == "tuple" else None
    if not items or len(items) not in (4, 5):
        w.refuse("a numpy array whose state is not numpy's (version, shape, dtype, order, data)")
    shape, dtype, data = items[-4], items[-3], items[-1]
    dims = shape.items if shape.kind == "tuple" else None
    if dims is None or len(dims) > MAX_DIMS or not all(isinstance(d.value, int) and d.value >= 0 for d in dims):
        w.refuse(f"a numpy array whose shape is not up to {MAX_DIMS} non-negative integers")
    count = 1
    for d in dims:
        count *= d.value
    have = _data_bytes(data)
    if have is None or count * _dtype_of(w, dtype) > have:
        w.refuse("a numpy array whose shape needs more bytes than it carries (or object data)")


def after_call(w, node) -> None:
    if node.value in _NUMPY_DTYPE:
        node.info = _dtype_itemsize(w, node.items)
    elif node.value in _NUMPY_SCALAR:
        _check_scalar(w, node.items)


def after_build(w, target, state) -> None:
    if target.kind != "call":
        return
    if target.value in _NUMPY_DTYPE:
        _check_dtype_state(w, state)
    elif target.value in _NUMPY_ARRAY:
        _check_array_state(w, state)
