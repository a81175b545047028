"""The command-line conventions every benchmark entry point shares: one-line errors with exit 2, and a
`--help` that shows the module's whole first paragraph (never a sentence cut at a line break)."""
from __future__ import annotations

import argparse
import sys


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph as one line: what `--help` opens with."""
    para = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(para.split())


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: what and how to fix it`, exit 2."""

    def __init__(self, doc: str, prog: str, **kw):
        super().__init__(prog=prog, description=first_paragraph(doc), **kw)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def refuse(prog: str, message: str) -> None:
    """A bad argument found after parsing: the same one-line form, exit 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


__all__ = ["Parser", "first_paragraph", "refuse"]
