"""The pickle machine of the bounded walk: reads every opcode of a pickle (protocols 0-5) without running
anything and drives `pickle_bounds.Walk`'s accounting with stand-in nodes (`check_pickle`).

Arguments are read in place (bytes or an mmap; long strings are skipped, never copied). One method per
opcode family; the dispatch is a 256-entry table. What each refusal means is in `pickle_bounds`.
"""
from __future__ import annotations

import codecs
import pickle
import struct

from .pickle_bounds import MAX_INT_BYTES, PROTOCOL_MAX, Node, PickleBoundsError, RefusedFile, Walk, budget
from .pickle_bounds import scalar as _scalar
from .pickle_numpy import after_build, after_call

_SMALL = [_scalar(v) for v in range(256)]  # BININT1 leaves, shared: frozen nodes are never changed


def _text(r, n: int, is_str: bool) -> Node:
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


def _text0(w: Walk, raw: bytes, quoted: bool) -> Node:
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
        self.stack: list[Node] = []
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
    def pop(self) -> Node:
        if not self.stack or (self.marks and self.marks[-1] >= len(self.stack)):
            self.w.malformed("its stack underflows")
        return self.stack.pop()

    def top(self) -> Node:
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

    def fixed_int(self, op):  # the hot paths read in place; past the end is struct.error, caught by the loop
        st = _FIXED_INT[op]
        v, self.pos = st.unpack_from(self.data, self.pos)[0], self.pos + st.size
        self.stack.append(_SMALL[v] if 0 <= v < 256 else _scalar(v))

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
        if op == 0x67:
            idx = self.int_line()
        else:
            st = _MEMO_IDX[op]
            idx, self.pos = st.unpack_from(self.data, self.pos)[0], self.pos + st.size
        node = self.w.memo.get(idx)
        if node is None:
            self.w.malformed(f"it fetches memo entry {idx}, which was never stored")
        node.frozen = True
        self.stack.append(node)

    def put(self, op):
        memo = self.w.memo
        if op in _MEMO_IDX:
            st = _MEMO_IDX[op]
            idx, self.pos = st.unpack_from(self.data, self.pos)[0], self.pos + st.size
        else:
            idx = len(memo) if op == 0x94 else self.int_line()
        if not isinstance(idx, int) or not 0 <= idx <= len(memo):
            self.w.refuse(f"memo index {idx} jumps past the {len(memo)} entries stored so far (the C "
                          "unpickler sizes its memo table by the index)")
        memo[idx] = self.top()

    def build_seq(self, op):
        n = _TUPLE_N.get(op)
        if n is None:
            items = self.from_mark()
        elif len(self.stack) - n < (self.marks[-1] if self.marks else 0):
            self.w.malformed("its stack underflows")
        else:
            items = self.stack[-n:]
            del self.stack[-n:]
        kind = _SEQ_KIND[op]
        if kind == "dict" and len(items) % 2:
            self.w.malformed("a DICT with an odd number of items")
        self.stack.append(self.w.node(items, kind, items=items if kind == "tuple" else None))

    def empty(self, op):
        self.stack.append(Node(kind=_SEQ_KIND[op], items=[] if op == 0x29 else None))

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
            fn, args = items[0], Node(kind="tuple", items=items[1:])
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
        self.stack.append(self.w.node([glob, *items], "call", name, Node(kind="tuple", items=items)))

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


_FIXED_INT = {0x4a: struct.Struct("<i"), 0x4b: struct.Struct("<B"), 0x4d: struct.Struct("<H")}  # BININT(1, 2)
_LEN_TEXT = {0x54: ("<i", 4, True), 0x55: ("<B", 1, True), 0x42: ("<I", 4, False), 0x43: ("<B", 1, False),
             0x8e: ("<Q", 8, False), 0x96: ("<Q", 8, False), 0x58: ("<I", 4, True), 0x8c: ("<B", 1, True),
             0x8d: ("<Q", 8, True)}  # BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 (BIN)UNICODE
_MEMO_IDX = {0x68: struct.Struct("<B"), 0x6a: struct.Struct("<I"), 0x71: struct.Struct("<B"),
             0x72: struct.Struct("<I")}  # BINGET LONG_BINGET BINPUT LONG_BINPUT
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
_OPS = [_TABLE.get(op, _M.refused) for op in range(256)]


def check_pickle(data, source: str, *, persistent: bool = False, max_nodes: int | None = None,
                 start: int = 0) -> Walk:
    """Walk the pickle starting at `data[start]` up to its STOP; raise PickleBoundsError when it is out of
    bounds (see the module docstring). `persistent`: persistent ids are allowed (torch checkpoints).
    Returns the Walk (its `end` is the offset after STOP: torch's legacy format is several pickles)."""
    data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data  # bytes or an mmap: read in place
    w = Walk(source, max_nodes or budget(len(data) - start), persistent)
    m = _Machine(data, start, w)
    table, n = _OPS, len(data)
    try:
        while w.end == 0:
            if m.pos >= n:
                w.malformed("it ends before its STOP opcode (cut short)")
            op = data[m.pos]
            m.pos += 1
            w.opcodes += 1
            table[op](m, op)
    except struct.error:
        w.malformed("it is cut short (an argument runs past the end of the data)")
    return w


def check_untrusted(data, source: str, refusal: type[Exception]) -> Walk:
    """check_pickle for a reader that unpickles next: a stream that is not a pickle at all raises
    pickle.UnpicklingError (damage), one out of bounds raises `refusal` (one line)."""
    try:
        return check_pickle(data, source)
    except PickleBoundsError as e:
        if e.malformed:
            raise pickle.UnpicklingError(str(e)) from None
        raise refusal(str(e)) from None


__all__ = ["check_pickle", "check_untrusted", "PickleBoundsError", "RefusedFile", "Walk"]
