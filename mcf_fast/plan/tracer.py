"""A dispatch mode that watches one training step run on fake tensors: live bytes and FLOPs, by part.

Memory. Every storage an operator creates inside the mode is counted from its creation until the last
tensor viewing it dies (a weak reference on the storage fires then), so saved activations count for as
long as autograd holds them, exactly as the caching allocator would see them. Storages that existed
before (parameters, buffers, optimizer state) are not counted: they are the persistent state the sheet
computes separately. New storages fall into three categories, because the sharded run differs from the
traced single-process one in exactly these:
  grad  a parameter's `.grad` (moved here when autograd accumulates it): FSDP2 keeps only a shard;
  cast  a copy of a parameter in another dtype (autocast's weight casts): FSDP2 with bf16 parameters
        computes on its own gathered bf16 copies instead;
  act   everything else: inputs, activations saved for backward, temporaries.
The mode keeps the running maximum of all, of act + cast and of act alone, each with the split of the
live bytes, the part and the phase at that moment.

FLOPs. Each operator's count comes from the same formulas `torch.utils.flop_counter.FlopCounterMode`
uses (the caller passes its registry), attributed to the part of the model that ran it: forward parts
are set by `run_part` around the model's methods; a backward operator gets the part recorded on the
autograd node that runs it (`run_part` labels the nodes each part creates).
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

PART_KEY = "mcf_fast.plan.part"
CATEGORIES = ("act", "cast", "grad")
_aten = torch.ops.aten
# metadata queries: no tensor is created, nothing to count (most of the calls a step makes)
_QUERIES = {torch.ops.prim.device.default, _aten.size.default, _aten.stride.default, _aten.dim.default,
            _aten.is_contiguous.default, _aten.numel.default, _aten.storage_offset.default,
            _aten.sym_size.default, _aten.sym_stride.default, _aten.sym_numel.default}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def label_graph(tensors, part: str) -> None:
    """Record `part` on every autograd node reachable from `tensors` that carries no part yet."""
    stack = [t.grad_fn for t in _tensors(tensors) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or PART_KEY in node.metadata:
            continue
        node.metadata[PART_KEY] = part
        stack.extend(fn for fn, _ in node.next_functions)


class StepTracer(TorchDispatchMode):
    """Enter inside a FakeTensorMode (see the module docstring). `persistent`: tensors whose storages
    exist before the step (not counted); `casts_of`: parameters whose dtype copies count as 'cast';
    `flop_registry`: FlopCounterMode's op packet -> formula map."""

    def __init__(self, persistent: Iterable[torch.Tensor], casts_of: Iterable[torch.Tensor],
                 flop_registry: dict):
        super().__init__()
        self._persistent = {id(t.untyped_storage()) for t in persistent}
        self._params = {id(p.untyped_storage()) for p in casts_of}
        self._records: dict[int, list] = {}  # storage id -> [bytes, category, part, weak reference]
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.live_by_part: dict[str, int] = defaultdict(int)  # act + cast bytes by the part that made them
        self.peak = {"all": 0, "act+cast": 0, "act": 0}
        self.at_peak: dict[str, dict] = {}
        self.flops: dict[str, int] = defaultdict(int)
        self.flops_by_op: dict[str, int] = defaultdict(int)
        self.registry = flop_registry
        self.part, self.phase = "other", "data"

    # ------------------------------------------------------------------ where we are
    @contextmanager
    def in_part(self, part: str):
        prev, self.part = self.part, part
        try:
            yield
        finally:
            self.part = prev

    def run_part(self, part: str, fn: Callable, *args, **kwargs):
        """fn(*args) as `part`: its forward operators and, through its autograd nodes, their backward."""
        label_graph((args, kwargs), "other")  # graph built before this call belongs to whoever built it
        with self.in_part(part):
            out = fn(*args, **kwargs)
        label_graph(out, part)
        return out

    def _where(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get(PART_KEY, "other"), "backward"
        return self.part, self.phase

    # ------------------------------------------------------------------ memory bookkeeping
    def _freed(self, key: int, _ref) -> None:
        rec = self._records.pop(key, None)
        if rec is not None:
            self.live[rec[1]] -= rec[0]
            if rec[2] is not None:
                self.live_by_part[rec[2]] -= rec[0]

    def _track(self, t: torch.Tensor, category: str) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._persistent or key in self._records:
            return
        n = st.nbytes()
        part = self._where()[0]
        self._records[key] = [n, category, part, weakref.ref(st, lambda r, k=key: self._freed(k, r))]
        self.live[category] += n
        self.live_by_part[part] += n
        self._update_peaks()

    def _update_peaks(self) -> None:
        act, cast, grad = self.live["act"], self.live["cast"], self.live["grad"]
        for view, value in (("all", act + cast + grad), ("act+cast", act + cast), ("act", act)):
            if value > self.peak[view]:
                self.peak[view] = value
                part, phase = self._where()
                self.at_peak[view] = {**self.live, "part": part, "phase": phase,
                                      "by_part": {k: v for k, v in self.live_by_part.items() if v}}

    def mark_grad(self, grad: torch.Tensor | None) -> None:
        """A parameter's .grad: move its storage to the 'grad' category."""
        if grad is None:
            return
        rec = self._records.get(id(grad.untyped_storage()))
        if rec is not None and rec[1] != "grad":
            self.live[rec[1]] -= rec[0]
            self.live_by_part[rec[2]] -= rec[0]
            rec[1], rec[2] = "grad", None  # gradients are counted apart from the parts' activations
            self.live["grad"] += rec[0]

    # ------------------------------------------------------------------ the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _QUERIES:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if inputs and not any(isinstance(t, FakeTensor) for t in inputs):
            # Only real tensors in (the sample ids and the masks drawn from them): compute for real,
            # since the mask generator reads values. They are small; they still count.
            with _disable_current_modes():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            n = formula(*args, **kwargs, out_val=out)
            self.flops[self._where()[0]] += n
            self.flops_by_op[str(func._overloadpacket)] += n
        cast = func is _aten._to_copy.default and inputs and id(inputs[0].untyped_storage()) in self._params
        for t in _tensors(out):
            self._track(t, "cast" if cast else "act")
        return out


__all__ = ["StepTracer", "label_graph", "PART_KEY", "CATEGORIES"]
