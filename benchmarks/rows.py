"""The report row: one provider's measurement of one case, and the ratios against its group's baseline.

A row is a dict: suite, what, shape, dtype, provider, is_baseline, median_ms, p20_ms, p80_ms, n,
peak_mib, speedup (baseline median / this median: > 1 is faster), mem_ratio (this peak / the
baseline's peak: < 1 is leaner), note (why a row is not measured, or what it models), extra (suite
specific: images/s, phase split, MFU...). Unmeasured rows keep median_ms = None and say why in note.
Rows of two reports are matched on KEY (`--compare`).
"""
from __future__ import annotations

KEY = ("suite", "what", "shape", "dtype", "provider")
GROUP = ("suite", "what", "shape", "dtype")  # the rows one baseline is compared with


def row(suite, what, shape, dtype, provider, *, is_baseline=False, stats=None, peak_bytes=None, note="",
        **extra) -> dict:
    """A report row; `stats` from harness.summarize (None: not measured, say why in `note`)."""
    r = {"suite": suite, "what": what, "shape": shape, "dtype": dtype, "provider": provider,
         "is_baseline": is_baseline, "median_ms": None, "p20_ms": None, "p80_ms": None, "n": 0,
         "peak_mib": None if peak_bytes is None else peak_bytes / 2**20, "speedup": None, "mem_ratio": None,
         "note": note, "extra": extra}
    if stats:
        r.update({k: stats[k] for k in ("median_ms", "p20_ms", "p80_ms", "n")})
    return r


def unmeasured(suite, what, shape, dtype, providers, note, **extra) -> list[dict]:
    """One row per (provider, is_baseline) saying why it was not measured."""
    return [row(suite, what, shape, dtype, p, is_baseline=b, note=note, **extra) for p, b in providers]


def add_ratios(rows: list[dict]) -> None:
    """Fill speedup / mem_ratio of each measured row against the measured baseline row of its GROUP."""
    base = {tuple(r[k] for k in GROUP): r for r in rows if r["is_baseline"] and r["median_ms"]}
    for r in rows:
        b = base.get(tuple(r[k] for k in GROUP))
        if b is None or not r["median_ms"]:
            continue
        r["speedup"] = b["median_ms"] / r["median_ms"]
        if r["peak_mib"] is not None and b["peak_mib"]:
            r["mem_ratio"] = r["peak_mib"] / b["peak_mib"]


def reason(note: str) -> str:
    """A row's note as the report prints it: 'not measured: why' -> 'not measured (why)'."""
    note = (note or "").strip()
    for head in ("not measured: ", "not measured - "):
        if note.startswith(head):
            return f"not measured ({note[len(head):].rstrip('.')})"
    return note


def failed(rows: list[dict]) -> list[dict]:
    """Rows whose provider disagreed with its reference or whose suite crashed."""
    return [r for r in rows if str(r.get("note", "")).startswith("FAILED")]


__all__ = ["KEY", "GROUP", "row", "unmeasured", "add_ratios", "reason", "failed"]
