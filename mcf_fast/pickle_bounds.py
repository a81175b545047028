"""Walk a pickle's opcodes without executing them and refuse streams whose structure is out of bounds.

Every pickle the project accepts from a user (torch checkpoints, DCP `.metadata`, LMDB keys and values,
box files) passes `check_pickle` before an unpickler builds anything. The walk simulates the pickle
machine's stack with stand-in nodes that record, for each object, how many objects a full traversal of
it visits (its *expansion*: what hashing it, comparing it or `np.asarray` on it costs) and its nesting
depth. Sharing through the memo is what makes a few bytes expensive: `T(i+1) = (T(i), T(i))` is 2 GETs
per level, so 64 levels (719 bytes) are a tuple of 2^64 leaves whose hash never ends. A GET therefore
adds the whole expansion of the object it fetches, and an object may not be changed once referenced
(no real pickler does that; it would let a shared leaf grow after the tree above it was counted).
The walk also refuses what makes CPython's C unpickler or numpy allocate far beyond the file: memo
indices that jump ahead (the C unpickler sizes its memo table by the index: 9 bytes cost 1 GB),
numpy dtypes with a sub-array or a large item (a scalar built without data zero-fills its item size),
object arrays, and arrays whose shape disagrees with their bytes. What is allowed to be *built* (which
globals) stays the loaders' business; this module bounds what building it may cost.
"""
from __future__ import annotations

import codecs
import struct

from .pickle_numpy import after_build, after_call

# Objects one file may expand to: a floor every small file gets, plus a share per byte. A million
# objects hash or walk in well under a second and hold ~100 MB at most when materialised.
MAX_NODES_FLOOR = 1 << 20
# Expansion allowed per byte of pickle beyond the floor. Real files expand 0.18-0.35 objects per byte
# (a ViT-B state dict, an MAE checkpoint with optimizer state and args, LAION-Face-style detections;
# tests/test_pickle_bounds.py measures them): 4 is a margin of 10x that still caps amplification.
NODES_PER_BYTE = 4
# Nesting depth: checkpoints nest under 12 levels (file -> state dict -> tensor -> size tuple);
# Python's recursive consumers (hash, repr, copy, json) fail near 1000.
MAX_DEPTH = 100
# A byte string or str weighs one object per this many bytes, so sharing a large one is counted.
BYTES_PER_NODE = 64
# Integers: checkpoints hold steps, seeds and sizes (at most 9 bytes); huge ones only cost time.
MAX_INT_BYTES = 32
PROTOCOL_MAX = 5


class RefusedFile(ValueError):
    """A reader refused a file; the message is one line naming the file, the reason and the fix."""


class PickleBoundsError(RefusedFile):
    """A pickle whose structure is out of bounds (or malformed): refused before anything was built.
    `malformed`: the stream is not a valid pickle at all (cut short, unknown opcode), which callers may
    treat as damage rather than as a hostile file."""

    def __init__(self, msg: str, malformed: bool = False):
        super().__init__(msg)
        self.malformed = malformed


class _Node:
    """Stand-in for one object the unpickler would build."""
    __slots__ = ("size", "depth", "frozen", "kind", "value", "items", "info")

    def __init__(self, size=1, depth=1, kind="", value=None, items=None):
        self.size, self.depth, self.frozen = size, depth, False
        self.kind, self.value, self.items, self.info = kind, value, items, None


class Walk:
    """What a walk saw: opcodes, memo entries, the largest expansion and depth, and the persistent ids
    (kept for the caller: torch's legacy format sizes its storages by them)."""

    def __init__(self, source: str, max_nodes: int, persistent: bool):
        self.source, self.max_nodes, self.persistent = source, max_nodes, persistent
        self.opcodes = self.max_size = self.max_depth = 0
        self.memo: dict[int, _Node] = {}
        self.pids: list = []
        self.end, self.root = 0, None

    def refuse(self, why: str, malformed: bool = False):
        raise PickleBoundsError(f"{self.source}: {why}; refused before unpickling anything (a file built to "
                                "exhaust memory or time, or a damaged one)", malformed)

    def malformed(self, why: str):
        self.refuse(f"{why} (not a valid pickle)", malformed=True)

    def node(self, parts, kind="", value=None, items=None, extra=1) -> _Node:
        """A new object made of `parts` (each now referenced, hence frozen)."""
        size, depth = extra, 0
        for p in parts:
            p.frozen = True
            size += p.size
            depth = max(depth, p.depth)
        return self.checked(_Node(size, depth + 1, kind, value, items))

    def grow(self, target: _Node, parts) -> None:
        """`target` takes in `parts` (APPEND, SETITEM, BUILD...): refused once target is shared."""
        if target.frozen:
            self.refuse("an object is modified after it was referenced elsewhere (shared structure that "
                        "grows behind the tree counted above it)")
        for p in parts:
            p.frozen = True
            target.size += p.size
            target.depth = max(target.depth, p.depth + 1)
        self.checked(target)

    def checked(self, n: _Node) -> _Node:
        if n.size > self.max_nodes:
            self.refuse(f"it expands to more than {self.max_nodes} objects through shared references "
                        "(a pickle bomb: a few bytes that hash or copy for ever)")
        if n.depth > MAX_DEPTH:
            self.refuse(f"it nests deeper than {MAX_DEPTH} levels")
        self.max_size = max(self.max_size, n.size)
        self.max_depth = max(self.max_depth, n.depth)
        return n


def budget(nbytes: int) -> int:
    """The expansion a pickle of `nbytes` bytes may reach."""
    return MAX_NODES_FLOOR + NODES_PER_BYTE * nbytes


def _scalar(value=None, nbytes=0, kind="scalar") -> _Node:
    """A leaf (number, string, None, global): born frozen, since no opcode may grow one."""
    node = _Node(1 + nbytes // BYTES_PER_NODE, 1, kind, value)
    node.frozen = True
    return node


def _text(r, n: int, is_str: bool) -> _Node:
    """A bytes or str argument of `n` bytes: keep short values (global names, dtype strings), weigh long ones."""
    start = r.skip(n)
    val = r.data[start:start + n] if n <= 256 else None
    if val is not None and is_str:
        try:
            val = val.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            r.w.malformed("a str that is not UTF-8")
    node = _scalar(val, n, "str" if is_str else "bytes")
    node.items = n  # its length in bytes: numpy's data sizes are read from it
    return node


def _text0(w: Walk, raw: bytes, quoted: bool) -> _Node:
    """Protocol 0 text: its escaped length bounds its real length; short values are decoded."""
    node = _scalar(None, len(raw), "str")
    node.items = len(raw)
    if len(raw) <= 256:
        try:
            node.value = (codecs.escape_decode(raw[1:-1])[0].decode("latin-1") if quoted
                          else raw.decode("raw-unicode-escape"))
        except (ValueError, UnicodeDecodeError):
            w.malformed("protocol-0 text that does not decode")
    return node


# ---------------------------------------------------------------------- the walk
class _Machine:
    """The pickle machine's stack, marks and memo, over stand-in nodes; one method per opcode family."""

    def __init__(self, data, pos: int, w: Walk):
        self.data, self.pos, self.w = data, pos, w
        self.stack: list[_Node] = []
        self.marks: list[int] = []

    # -- reading arguments in place (an mmap is never copied; long strings are skipped)
    def skip(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.data):
            self.w.malformed("it is cut short (an argument runs past the end of the data)")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, n: int) -> int:
        return struct.unpack_from(fmt, self.data, self.skip(n))[0]

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            self.w.malformed("it is cut short (a text argument has no end of line)")
        out, self.pos = self.data[self.pos:end], end + 1
        return out

    def int_line(self) -> int | bool:
        raw = self.line()
        if raw in (b"00", b"01"):
            return raw == b"01"
        text = raw.rstrip(b"L")
        if len(text) > MAX_INT_BYTES * 3:
            self.w.refuse(f"an integer of {len(text)} digits")
        try:
            return int(text)
        except ValueError:
            self.w.malformed("an integer that does not parse")

    # -- the stack
    def pop(self) -> _Node:
        if not self.stack or (self.marks and self.marks[-1] >= len(self.stack)):
            self.w.malformed("its stack underflows")
        return self.stack.pop()

    def top(self) -> _Node:
        if not self.stack or (self.marks and self.marks[-1] >= len(self.stack)):
            self.w.malformed("its stack underflows")
        return self.stack[-1]

    def from_mark(self) -> list:
        if not self.marks:
            self.w.malformed("it pops to a MARK it never set")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    # -- opcodes
    def mark(self, op):
        self.marks.append(len(self.stack))

    def fixed_int(self, op):
        fmt, n = _FIXED_INT[op]
        self.stack.append(_scalar(struct.unpack_from(fmt, self.data, self.skip(n))[0]))

    def text(self, op):
        fmt, n, is_str = _LEN_TEXT[op]
        self.stack.append(_text(self, self.unpack(fmt, n), is_str))

    def text0(self, op):
        self.stack.append(_text0(self.w, self.line(), op == 0x53))

    def long_bin(self, op):
        n = self.unpack("<B", 1) if op == 0x8a else self.unpack("<i", 4)
        if not 0 <= n <= MAX_INT_BYTES:
            self.w.refuse(f"an integer of {n} bytes (at most {MAX_INT_BYTES})")
        start = self.skip(n)
        self.stack.append(_scalar(int.from_bytes(self.data[start:start + n], "little", signed=True)))

    def other_scalar(self, op):
        if op == 0x4e:
            node = _scalar(kind="none")
        elif op in (0x88, 0x89):
            node = _scalar(op == 0x88)
        elif op == 0x47:
            node = _scalar(self.unpack(">d", 8))
        elif op == 0x46:
            node = _scalar(None, len(self.line()))
        else:  # INT LONG (text)
            node = _scalar(self.int_line())
        self.stack.append(node)

    def get(self, op):
        idx = self.int_line() if op == 0x67 else self.unpack(*_MEMO_IDX[op])
        node = self.w.memo.get(idx)
        if node is None:
            self.w.malformed(f"it fetches memo entry {idx}, which was never stored")
        node.frozen = True
        self.stack.append(node)

    def put(self, op):
        memo = self.w.memo
        idx = len(memo) if op == 0x94 else self.int_line() if op == 0x70 else self.unpack(*_MEMO_IDX[op])
        if not isinstance(idx, int) or not 0 <= idx <= len(memo):
            self.w.refuse(f"memo index {idx} jumps past the {len(memo)} entries stored so far (the C "
                          "unpickler sizes its memo table by the index)")
        memo[idx] = self.top()

    def build_seq(self, op):
        items = [self.pop() for _ in range(_TUPLE_N[op])][::-1] if op in _TUPLE_N else self.from_mark()
        kind = _SEQ_KIND[op]
        if kind == "dict" and len(items) % 2:
            self.w.malformed("a DICT with an odd number of items")
        self.stack.append(self.w.node(items, kind, items=items if kind == "tuple" else None))

    def empty(self, op):
        self.stack.append(_Node(kind=_SEQ_KIND[op], items=[] if op == 0x29 else None))

    def grow(self, op):
        if op in (0x61, 0x73, 0x62):  # APPEND SETITEM BUILD
            parts = [self.pop() for _ in range(2 if op == 0x73 else 1)]
        else:  # APPENDS SETITEMS ADDITEMS
            parts = self.from_mark()
            if op == 0x75 and len(parts) % 2:
                self.w.malformed("a SETITEMS with an odd number of items")
        target = self.top()
        self.w.grow(target, parts)
        if op == 0x62:
            after_build(self.w, target, parts[0])

    def call(self, op):
        if op == 0x92:  # NEWOBJ_EX: cls, args, kwargs
            kw, args, fn = self.pop(), self.pop(), self.pop()
            parts = (fn, args, kw)
        elif op == 0x6f:  # OBJ: MARK cls args...
            items = self.from_mark()
            if not items:
                self.w.malformed("an OBJ without a class")
            fn, args = items[0], _Node(kind="tuple", items=items[1:])
            parts = items
        else:  # REDUCE NEWOBJ
            args = self.pop()
            fn = self.pop()
            parts = (fn, args)
        node = self.w.node(parts, "call", fn.value if fn.kind == "global" else None, args)
        after_call(self.w, node)
        self.stack.append(node)

    def glob(self, op):
        if op == 0x93:  # STACK_GLOBAL
            name, module = self.pop(), self.pop()
            if not (isinstance(module.value, str) and isinstance(name.value, str)):
                self.w.refuse("a STACK_GLOBAL whose module and name are not short strings")
            self.stack.append(_scalar(f"{module.value}.{name.value}", kind="global"))
            return
        name = f"{self.line().decode('utf-8', 'replace')}.{self.line().decode('utf-8', 'replace')}"
        glob = _scalar(name, kind="global")
        if op == 0x63:  # GLOBAL
            self.stack.append(glob)
            return
        items = self.from_mark()  # INST
        self.stack.append(self.w.node([glob, *items], "call", name, _Node(kind="tuple", items=items)))

    def persid(self, op):
        pid = self.pop() if op == 0x51 else _text0(self.w, self.line(), False)
        if not self.w.persistent:
            self.w.refuse("it holds a persistent reference, which this kind of file never has")
        self.w.pids.append(pid)
        self.stack.append(self.w.node([pid], "persistent", items=pid))

    def stack_op(self, op):
        if op == 0x30:  # POP (of a MARK when one is on top)
            if self.marks and self.marks[-1] == len(self.stack):
                self.marks.pop()
            else:
                self.pop()
        elif op == 0x31:  # POP_MARK
            self.from_mark()
        elif op == 0x32:  # DUP
            top = self.top()
            top.frozen = True
            self.stack.append(top)
        else:  # READONLY_BUFFER
            self.top()

    def framing(self, op):
        if op == 0x80:
            if self.unpack("<B", 1) > PROTOCOL_MAX:
                self.w.refuse(f"pickle protocol above {PROTOCOL_MAX}")
        elif self.unpack("<Q", 8) > len(self.data) - self.pos:  # FRAME
            self.w.refuse("a frame longer than the data left")

    def stop(self, op):
        if len(self.stack) != 1 or self.marks:
            self.w.malformed("it stops with a malformed stack")
        self.w.end, self.w.root = self.pos, self.stack[0]

    def refused(self, op):
        why = {0x82: "it uses the copyreg extension registry (EXT1/2/4), which no checkpoint needs",
               0x97: "it asks for an out-of-band buffer (NEXT_BUFFER), which no file can carry"}
        if _EXT.get(op, op) not in why:
            self.w.malformed(f"unknown opcode 0x{op:02x} at byte {self.pos - 1}")
        self.w.refuse(why[_EXT.get(op, op)])


_FIXED_INT = {0x4a: ("<i", 4), 0x4b: ("<B", 1), 0x4d: ("<H", 2)}  # BININT BININT1 BININT2
_LEN_TEXT = {0x54: ("<i", 4, True), 0x55: ("<B", 1, True), 0x42: ("<I", 4, False), 0x43: ("<B", 1, False),
             0x8e: ("<Q", 8, False), 0x96: ("<Q", 8, False), 0x58: ("<I", 4, True), 0x8c: ("<B", 1, True),
             0x8d: ("<Q", 8, True)}  # BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 (BIN)UNICODE
_MEMO_IDX = {0x68: ("<B", 1), 0x6a: ("<I", 4), 0x71: ("<B", 1), 0x72: ("<I", 4)}  # BINGET LONG_BINGET (LONG_)BINPUT
_TUPLE_N = {0x85: 1, 0x86: 2, 0x87: 3}
_SEQ_KIND = {0x74: "tuple", 0x6c: "list", 0x64: "dict", 0x91: "set", 0x85: "tuple", 0x86: "tuple", 0x87: "tuple",
             0x29: "tuple", 0x5d: "list", 0x7d: "dict", 0x8f: "set"}
_EXT = {0x83: 0x82, 0x84: 0x82}
_M = _Machine
_TABLE = {0x28: _M.mark, **dict.fromkeys(_FIXED_INT, _M.fixed_int), **dict.fromkeys(_LEN_TEXT, _M.text),
          0x53: _M.text0, 0x56: _M.text0, 0x8a: _M.long_bin, 0x8b: _M.long_bin,
          **dict.fromkeys((0x4e, 0x88, 0x89, 0x47, 0x46, 0x49, 0x4c), _M.other_scalar),
          **dict.fromkeys((0x68, 0x6a, 0x67), _M.get), **dict.fromkeys((0x71, 0x72, 0x70, 0x94), _M.put),
          **dict.fromkeys((0x74, 0x6c, 0x64, 0x91, 0x85, 0x86, 0x87), _M.build_seq),
          **dict.fromkeys((0x29, 0x5d, 0x7d, 0x8f), _M.empty),
          **dict.fromkeys((0x61, 0x73, 0x65, 0x75, 0x90, 0x62), _M.grow),
          **dict.fromkeys((0x52, 0x81, 0x92, 0x6f), _M.call),
          **dict.fromkeys((0x63, 0x69, 0x93), _M.glob), 0x51: _M.persid, 0x50: _M.persid,
          **dict.fromkeys((0x30, 0x31, 0x32, 0x98), _M.stack_op), 0x80: _M.framing, 0x95: _M.framing,
          0x2e: _M.stop}


def check_pickle(data, source: str, *, persistent: bool = False, max_nodes: int | None = None,
                 start: int = 0) -> Walk:
    """Walk the pickle starting at `data[start]` up to its STOP; raise PickleBoundsError when it is out of
    bounds (see the module docstring). `persistent`: persistent ids are allowed (torch checkpoints).
    Returns the Walk (its `end` is the offset after STOP: torch's legacy format is several pickles)."""
    data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data  # bytes or an mmap: read in place
    w = Walk(source, max_nodes or budget(len(data) - start), persistent)
    m = _Machine(data, start, w)
    table, refused, n = _TABLE, _Machine.refused, len(data)
    while w.end == 0:
        if m.pos >= n:
            w.malformed("it ends before its STOP opcode (cut short)")
        op = data[m.pos]
        m.pos += 1
        w.opcodes += 1
        table.get(op, refused)(m, op)
    return w


__all__ = ["RefusedFile", "PickleBoundsError", "Walk", "check_pickle", "budget"]
