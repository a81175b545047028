"""Walk a pickle's opcodes without executing them and refuse streams whose structure is out of bounds.

Every pickle the project accepts from a user (torch checkpoints, DCP `.metadata`, LMDB keys and values,
box files) passes `pickle_walk.check_pickle` before an unpickler builds anything. The walk simulates the pickle
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

Here: the limits, the refusal types and the accounting (`Walk`, its stand-in nodes); the opcode
machine that drives them is `pickle_walk`, numpy's rules `pickle_numpy`.
"""
from __future__ import annotations

# Objects one file may expand to: a floor every small file gets, plus a share per byte. A million
# objects hash or walk in well under a second and hold ~100 MB at most when materialised.
MAX_NODES_FLOOR = 1 << 20
# Expansion allowed per byte of pickle beyond the floor. Real files expand 0.08-0.35 objects per byte
# (a ViT-B state dict 0.18, an MAE checkpoint with optimizer state and args 0.23, LAION-Face-style
# detections 0.35, DCP metadata 0.29, LMDB keys 0.08; tests/test_pickle_bounds.py measures the torch
# ones): 4 is a margin of over 10x that still caps amplification.
NODES_PER_BYTE = 4
# Nesting depth: real files nest at most 12 levels (DCP metadata; a state dict 7, an MAE checkpoint 9);
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


class Node:
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
        self.memo: dict[int, Node] = {}
        self.pids: list = []
        self.end, self.root = 0, None

    def refuse(self, why: str, malformed: bool = False):
        raise PickleBoundsError(f"{self.source}: {why}; refused before unpickling anything (a file built to "
                                "exhaust memory or time, or a damaged one)", malformed)

    def malformed(self, why: str):
        self.refuse(f"{why} (not a valid pickle)", malformed=True)

    def node(self, parts, kind="", value=None, items=None, extra=1) -> Node:
        """A new object made of `parts` (each now referenced, hence frozen)."""
        size, depth = extra, 0
        for p in parts:
            p.frozen = True
            size += p.size
            if p.depth > depth:
                depth = p.depth
        return self.checked(Node(size, depth + 1, kind, value, items))

    def grow(self, target: Node, parts) -> None:
        """`target` takes in `parts` (APPEND, SETITEM, BUILD...): refused once target is shared."""
        if target.frozen:
            self.refuse("an object is modified after it was referenced elsewhere (shared structure that "
                        "grows behind the tree counted above it)")
        for p in parts:
            p.frozen = True
            target.size += p.size
            if p.depth >= target.depth:
                target.depth = p.depth + 1
        self.checked(target)

    def checked(self, n: Node) -> Node:
        if n.size > self.max_size:  # comparisons, not max(): this runs once per object of the file
            if n.size > self.max_nodes:
                self.refuse(f"it expands to more than {self.max_nodes} objects through shared references "
                            "(a pickle bomb: a few bytes that hash or copy for ever)")
            self.max_size = n.size
        if n.depth > self.max_depth:
            if n.depth > MAX_DEPTH:
                self.refuse(f"it nests deeper than {MAX_DEPTH} levels")
            self.max_depth = n.depth
        return n


def budget(nbytes: int) -> int:
    """The expansion a pickle of `nbytes` bytes may reach."""
    return MAX_NODES_FLOOR + NODES_PER_BYTE * nbytes


def scalar(value=None, nbytes=0, kind="scalar") -> Node:
    """A leaf (number, string, None, global): born frozen, since no opcode may grow one."""
    node = Node(1 + nbytes // BYTES_PER_NODE, 1, kind, value)
    node.frozen = True
    return node


__all__ = ["RefusedFile", "PickleBoundsError", "Walk", "budget", "scalar", "MAX_NODES_FLOOR", "NODES_PER_BYTE",
           "MAX_DEPTH", "BYTES_PER_NODE", "MAX_INT_BYTES", "PROTOCOL_MAX"]
