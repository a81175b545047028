"""Reading files users hand us without trusting them: regular files only, bounded size, finite walks.

- `read_regular(path, max_bytes)`: opens with O_NONBLOCK (a FIFO named `x.jpg` must not block the
  open), checks S_ISREG on the open descriptor (a symlink to /dev/zero is a character device, never
  read), refuses files above the cap before reading them, and never reads more than the cap.
- `walk_images(root)`: the folder's image files in os.walk's sorted order (a folder's files, then its
  sub-folders, depth first), following symlinks but never into a folder above (a loop: two symlinks
  to `.` made os.walk endless) and into each directory (device, inode) once, so a web of links to
  the same folders cannot multiply the walk either. What it leaves out is counted by reason.
"""
from __future__ import annotations

import os
import stat
from collections import Counter

from .decode import IMAGE_EXTS
from .reasons import BadSample

MAX_FILE_MB = 64  # default cap of one image file / tar member (data.max_file_mb)


def read_regular(path: str, max_bytes: int = MAX_FILE_MB << 20) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; raise BadSample naming what it is otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in a path from a list file
        raise BadSample("unreadable_file", f"{path!r}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadSample("not_regular_file", f"{path}: not a regular file (mode {oct(st.st_mode)})")
        if st.st_size > max_bytes:
            raise BadSample("too_large", f"{path}: {st.st_size} bytes > {max_bytes} (data.max_file_mb)")
        chunks, left = [], max_bytes + 1  # +1: a file growing past the cap while we read is caught too
        while left > 0:
            b = os.read(fd, min(left, 1 << 22))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    except OSError as e:
        raise BadSample("unreadable_file", f"{path}: {e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadSample("too_large", f"{path}: grew past {max_bytes} bytes while read (data.max_file_mb)")
    return data


def pread_member(fd: int, offset: int, size: int, max_bytes: int, shard: str, key: str) -> bytes:
    """`size` bytes at `offset` of an open shard, after checking the size an index or header claims."""
    if size > max_bytes:  # a hostile header or index: never ask the OS for 60 GiB
        raise BadSample("too_large", f"{shard}:{key}: member of {size} bytes > {max_bytes} (data.max_file_mb)")
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise BadSample("unreadable_file", f"{shard}:{key}: {e}") from None
    if len(data) != size:
        raise BadSample("corrupt", f"{shard}:{key}: {len(data)} of {size} bytes (the shard is cut short)")
    return data


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def _list_dir(path: str, stats: Counter) -> tuple[list, list] | None:
    """(sorted sub-folder entries, sorted file entries) of one folder, or None when unlistable."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        stats["unreadable_folder"] += 1
        return None
    dirs, files = [], []
    for e in entries:
        try:
            is_dir = e.is_dir()  # follows symlinks, as os.walk(followlinks=True) does
        except OSError:
            is_dir = False
        (dirs if is_dir else files).append(e)
    return dirs, files


def _image_files(files: list, paths: list, stats: Counter) -> None:
    """Append the regular image files among one folder's file entries; count the others."""
    for e in files:
        if not _is_image_name(e.name):
            continue
        try:
            regular = stat.S_ISREG(os.stat(e.path).st_mode) if e.is_symlink() else e.is_file()
        except OSError:  # a broken symlink
            stats["unreadable_file"] += 1
            continue
        if regular:
            paths.append(e.path)
        else:
            stats["not_regular_file"] += 1


def _in_chain(key, chain) -> bool:
    while chain is not None:
        if chain[0] == key:
            return True
        chain = chain[1]
    return False


def walk_images(root: str) -> tuple[list[str], Counter]:
    """(image paths in os.walk's sorted order, Counter of what was left out by reason). A symlink to
    a folder above it is a loop (`symlink_loop`, not entered); a folder reached a second time through
    another path is walked once, where os.walk meets it first (`duplicate_folder`)."""
    stats: Counter = Counter()
    paths: list[str] = []
    try:
        st = os.stat(root)
    except OSError:
        stats["unreadable_folder"] += 1
        return paths, stats
    seen = set()
    # explicit stack (a deep tree must not hit Python's recursion limit) of (path, (dev, ino), ancestors),
    # ancestors a linked list ((dev, ino), parent's list)
    stack = [(root, (st.st_dev, st.st_ino), None)]
    while stack:
        path, key, chain = stack.pop()
        if key in seen:
            stats["duplicate_folder"] += 1
            continue
        seen.add(key)
        listed = _list_dir(path, stats)
        if listed is None:
            continue
        dirs, files = listed
        _image_files(files, paths, stats)
        chain = (key, chain)
        todo = []
        for e in dirs:
            try:
                s = os.stat(e.path)
            except OSError:
                stats["unreadable_folder"] += 1
                continue
            sub = (s.st_dev, s.st_ino)
            if _in_chain(sub, chain):
                stats["symlink_loop"] += 1
                continue
            todo.append((e.path, sub, chain))
        stack.extend(reversed(todo))  # first sub-folder on top: depth-first in sorted order
    return paths, stats
