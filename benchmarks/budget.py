"""The wall-clock budget of a benchmark run (`--budget-s`): one deadline that the run checks between
suites, every suite checks between its cases, and the timing harness checks inside a measurement.

A suite gets a `share` of what is left (what an earlier suite did not use flows to the later ones);
a measurement that would not fit raises `BudgetSpent` before it starts, and the suite reports that
row as "not measured: ..." and names it in `skipped`, so the report says what the budget cost.
"""
from __future__ import annotations

import time


class BudgetSpent(Exception):
    """A measurement does not fit in what is left of the budget (the message says why, in words)."""


class Budget:
    """A deadline on the monotonic clock; `shares` of it keep the deadline of the whole run."""

    def __init__(self, seconds: float, *, start: float | None = None, deadline: float | None = None,
                 skipped: list | None = None):
        self.seconds = float(seconds)
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + self.seconds if deadline is None else deadline
        self.skipped = [] if skipped is None else skipped  # shared by every share of one run

    def left(self) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0

    def share(self, weight: float, total_weight: float) -> "Budget":
        """A budget for one part: `weight / total_weight` of what is left now, never past this deadline."""
        left = max(0.0, self.left())
        part = left * weight / total_weight if total_weight > 0 else left
        now = time.monotonic()
        return Budget(part, start=now, deadline=min(self.deadline, now + part), skipped=self.skipped)

    def skip(self, what: str, why: str) -> str:
        """Record `what` as not measured for lack of budget; returns the row note."""
        self.skipped.append(f"{what} ({why})")
        return f"not measured: {why}"

    def require(self, seconds: float, what: str) -> None:
        """Raise BudgetSpent unless `seconds` fit in what is left."""
        left = self.left()
        if seconds > left:
            raise BudgetSpent(f"{what}: about {seconds:.1f} s needed, {max(left, 0):.1f} s of the budget left")


__all__ = ["Budget", "BudgetSpent"]
