"""This process's resident memory, read the way that is true for it alone.

`getrusage(...).ru_maxrss` is the wrong peak for a program started by a larger one: Linux carries the
parent's high-water mark into the child when it forks and execs (the child then reports, say, the 2 GB
of the test runner or launcher that started it, not its own 200 MB). `VmHWM` in /proc/self/status belongs
to the process's own address space, so it is used where it exists; elsewhere `ru_maxrss` is the fallback.
"""
from __future__ import annotations

import resource
import sys


def status_kib(key: str) -> int | None:
    """A `Vm...` line of /proc/self/status in KiB, or None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def rss_bytes() -> int:
    """Resident memory now (where that cannot be read: the peak so far)."""
    kib = status_kib("VmRSS")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """The largest resident memory this process has had (since start, or since its mark was last reset
    through /proc/self/clear_refs)."""
    kib = status_kib("VmHWM")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes()


__all__ = ["status_kib", "rss_bytes", "peak_rss_bytes"]
