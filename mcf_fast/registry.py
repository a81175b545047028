"""Named kinds of a variation point (a teacher, a data source, a mask kind, an attention backend, a
checkpoint layout), each declared once.

A `Registry` maps a name to an *entry*: an object (usually a class) that owns everything about its kind:
  name       the registry key, as the user types it (`--model.teacher random`)
  summary    one line for `--help` and for error messages
  fields     the config fields (`"model.teacher_depth"`, ...) the kind reads, for help and documentation
  precheck   `precheck(cfg) -> None`: cheap checks of the whole config before anything is built or
             written (file headers may be read, tensors are not); raises ValueError with one line that
             names the option and the fix
  build      whatever the variation point needs to make the thing (its signature is the point's own)
Config validation, the CLI's `--help` choices, the pre-flight checks and the builders ask the registry,
so adding a kind is one class, one `register` line and one test.

This module imports nothing heavy: the pre-flight checks use it before torch work starts.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Generic, Iterator, NamedTuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`name -> entry` for one variation point; `option` is the command-line option that picks one."""

    def __init__(self, what: str, option: str):
        self.what, self.option = what, option
        self._entries: dict[str, T] = {}

    def register(self, entry: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Add `entry` under `name` (default: `entry.name`); usable as a class decorator. A name taken
        by another entry is an error: kinds are declared once."""
        def add(e: T) -> T:
            key = name or getattr(e, "name", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.what} entry needs a non-empty string name, got {key!r}")
            old = self._entries.get(key)
            if old is not None and old is not e:
                raise ValueError(f"{self.what} {key!r} is already registered ({old!r})")
            self._entries[key] = e
            return e
        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def registered(self, entry: T, *, name: str | None = None) -> Iterator[T]:
        """Register `entry` for the duration of a `with` block (tests that add a toy kind)."""
        self.register(entry, name=name)
        try:
            yield entry
        finally:
            self.unregister(name or entry.name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def choices(self, sep: str = ", ") -> str:
        """The names as the user types them, for help texts and errors."""
        return sep.join(self._entries)

    def describe(self) -> str:
        """"'a' (its summary), 'b' (...) or 'c' (...)": the choices with their summaries, for help texts."""
        parts = [f"'{n}' ({getattr(e, 'summary', '')})" if getattr(e, "summary", "") else f"'{n}'"
                 for n, e in self._entries.items()]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]

    def get(self, name: str) -> T:
        """The entry for `name`; an unknown one is a ValueError that lists the choices (did you mean...)."""
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{self.option} {name!r}: unknown {self.what}{hint}; choose one of {self.choices()}")
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {self.choices()})"


class Choice(NamedTuple):
    """One value of a closed set of names (`--model.head_init xavier`): the name and what it does."""
    name: str
    summary: str


def choices(what: str, option: str, named: dict[str, str]) -> Registry[Choice]:
    """A registry of plain names with one-line summaries, for options that pick among a few behaviours
    of one piece of code (declared beside that code; the config validates and documents through it)."""
    reg: Registry[Choice] = Registry(what, option)
    for name, summary in named.items():
        reg.register(Choice(name, summary))
    return reg


__all__ = ["Registry", "Choice", "choices"]
