"""Cheap looks at a path before anything is read in earnest: what kind of file it is, how many images a
folder holds (stopping as soon as enough are found), and the entries of a list file.

Nothing here opens a file that is not a regular file (a FIFO named `list.txt` would block the open)
or reads more of a list than the caller asks for, so the pre-flight checks stay fast on a 20M-image
folder and safe on hostile paths. Imports nothing beyond the standard library.
"""
from __future__ import annotations

import os
import stat
from collections import Counter

from .decode import IMAGE_EXTS

LIST_EXTS = (".txt", ".lst", ".list")
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISREG, "a regular file"))


def describe(path: str) -> str:
    """'a FIFO (named pipe)', 'a character device', 'a folder', 'a regular file', ... or 'missing'."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return "missing"
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def is_regular(path: str) -> bool:
    return describe(path) == "a regular file"


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def count_images(root: str, limit: int) -> tuple[int, bool, Counter]:
    """(image files found, whether the count is exact, other file extensions seen) in `root`, any depth.

    Stops once `limit` images are found (then the count is a lower bound). Folder symlinks are not
    followed here (the loader's `files.walk_images` follows them safely); when one was met the count is
    not exact either, and a caller that needs the exact number asks `walk_images`."""
    found, exact, others = 0, True, Counter()
    stack = [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            exact = False
            continue
        with it:  # unsorted: the count does not depend on order, and a huge folder is never listed whole
            for e in _entries(it):
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_symlink() and e.is_dir():
                        exact = False
                    elif is_image_name(e.name) and e.is_file():  # follows a file symlink; a FIFO is no file
                        found += 1
                        if found >= limit:
                            return found, False, others
                    else:
                        others[os.path.splitext(e.name)[1].lower() or "(no extension)"] += 1
                except OSError:
                    exact = False
    return found, exact, others


def _entries(it):
    """A scandir iterator that ends, instead of raising, when the folder vanishes mid-listing."""
    try:
        yield from it
    except OSError:
        return


def list_entries(path: str, limit: int | None = None) -> list[str]:
    """Up to `limit` entries of a UTF-8 list file (blank lines and `#` comments skipped), relative
    entries joined to the list file's folder. Raises ValueError (UTF-8) or OSError."""
    base = os.path.dirname(os.path.abspath(path))
    out: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
                if limit is not None and len(out) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise ValueError(f"a list file must be UTF-8 text, one path per line ({e})") from None
    return out


def first_list_entry(path: str) -> str | None:
    """The first entry of a list file, or None when the path is no readable regular list file."""
    if not (path.endswith(LIST_EXTS) and is_regular(path)):
        return None
    try:
        entries = list_entries(path, 1)
    except (OSError, ValueError):
        return None
    return entries[0] if entries else None


def others_text(others: Counter) -> str:
    """' (it holds 3 .txt, 1 .md files)' for an error about a folder without images, or ''."""
    if not others:
        return ""
    parts = [f"{n} {ext}" for ext, n in others.most_common(3)]
    more = " and more" if len(others) > 3 else ""
    return f" (it holds {', '.join(parts)}{more} files)"
