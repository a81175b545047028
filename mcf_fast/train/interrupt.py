"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal asks the run to stop at the next step boundary. Every rank stops after the same step
(the ranks vote through a one-number all-reduce on a CPU group), a checkpoint is written when more than
`run.interrupt_ckpt_after_s` seconds of training would otherwise be lost, and the run ends with
"interrupted at step N; rerun the same command to resume from step M" on the console and in train.log,
exit status 130, no traceback. A second signal stops at once, without a checkpoint.

A Ctrl-C in a terminal reaches torchrun's workers twice: directly (the terminal signals the whole
foreground process group) and again forwarded by torchrun. Signals within `SAME_PRESS_S` of the first
therefore count as the same press.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

EXIT_CODE = 130  # the shell's code for a run ended by Ctrl-C
SAME_PRESS_S = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after `step` optimizer steps; its newest complete checkpoint holds
    `resume_from` steps (0: none, a rerun starts over). A KeyboardInterrupt, so code that catches
    Exception does not swallow it."""

    def __init__(self, step: int, resume_from: int, at_once: bool = False):
        super().__init__(step, resume_from, at_once)
        self.step, self.resume_from, self.at_once = step, resume_from, at_once

    def __str__(self) -> str:
        how = " (second signal: stopped at once, without a checkpoint)" if self.at_once else ""
        where = f"resume from step {self.resume_from}" if self.resume_from else \
            "start again from step 0 (no checkpoint was written yet)"
        return f"interrupted at step {self.step}{how}; rerun the same command to {where}"


class StopSignals:
    """SIGINT/SIGTERM handlers for the `with` block (restored after it): the first signal sets
    `requested`; a second one, at least SAME_PRESS_S later, raises KeyboardInterrupt where the program is.
    Outside the main thread Python cannot install handlers: the default behaviour stays."""

    def __init__(self):
        self.first_at: float | None = None
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at, self.signum = now, signum
            return
        if now - self.first_at >= SAME_PRESS_S:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


class StopVote:
    """Whether the ranks stop at this step boundary. One process: when a signal came. Several: each
    boundary starts a non-blocking MAX all-reduce of this rank's flag on a gloo group and reads the one
    started at the previous boundary (finished long since), so every rank stops after the same step, one
    step after the first rank saw a signal, and no boundary waits for the others or for the GPU."""

    def __init__(self, distributed: bool):
        import torch.distributed as dist
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._pending = None

    def poll(self, local: bool) -> bool:
        if self.group is None:
            return local
        import torch
        import torch.distributed as dist
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(local)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def agree(self, local: bool) -> bool:
        """True on every rank when it is True on any (a blocking vote, for the rare decisions)."""
        if self.group is None:
            return local
        import torch
        import torch.distributed as dist
        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def close(self) -> None:
        """Finish the vote in flight (every rank calls this at the same point)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def exit_status(e: KeyboardInterrupt) -> int:
    """The command's exit status for an interrupt. `Interrupted` has said where the run stopped; a plain
    KeyboardInterrupt came while no steps were running (setting up, exporting, between the demo's stages):
    say what a rerun does, in train.log too when the run has one."""
    if not isinstance(e, Interrupted):
        msg = "interrupted outside the training steps; rerun the same command to resume from the newest checkpoint"
        log = logging.getLogger("mcf_fast")
        if log.handlers:
            log.warning(msg)
        else:
            print(msg, file=sys.stderr)
    return EXIT_CODE


__all__ = ["Interrupted", "StopSignals", "StopVote", "exit_status", "EXIT_CODE", "SAME_PRESS_S"]
