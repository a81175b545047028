"""Ways for tests to run training without starting an interpreter per run (each start imports torch:
seconds on an idle 2-core machine, up to a minute under load).

    main_here(main, argv)      a CLI's main(argv) in this process, as `python -m` would run it
    TwoRanks().run(fn, ...)    fn(rank, world, ...) on two spawned CPU ranks (gloo) kept for the session
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback

import torch


def main_here(main, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr text) of `main(argv)` run here, with SystemExit mapped as the interpreter maps
    it (None -> 0, a message -> printed, 1). What a run changes process-wide is put back afterwards:
    torch's thread count, the 'mcf_fast' logger's handlers (its file handlers closed), signal handlers."""
    threads = torch.get_num_threads()
    logger = logging.getLogger("mcf_fast")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    sigs = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv) or 0
            except SystemExit as e:
                rc = e.code
                if isinstance(rc, str):
                    print(rc, file=sys.stderr)
                    rc = 1
                rc = rc or 0
    finally:
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        for s, h in sigs.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
    return rc, err.getvalue()


# ----------------------------------------------------------------------------------- two ranks
def _serve(rank: int, world: int, store_dir: str, jobs, results) -> None:
    """A rank's loop: run each job under a gloo group (made anew when a job destroyed it), report back."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    while True:
        n, fn, args = jobs.get()
        try:
            if not dist.is_initialized():
                # a new file per group: a store file is never reused by a later group
                dist.init_process_group("gloo", init_method=f"file://{store_dir}/store_{n}", rank=rank,
                                        world_size=world, timeout=datetime.timedelta(seconds=300))
            results.put((n, rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - everything goes back to the test that asked
            results.put((n, rank, False, traceback.format_exc()))


class TwoRanks:
    """Two spawned CPU processes that stay up between jobs: the interpreter start and torch import are paid
    once per session instead of once per test. A job that fails on a rank stops the pair (the other rank
    may wait in a collective); the next job starts a fresh pair."""

    world = 2

    def __init__(self):
        self.procs = None
        self.count = 0

    def _start(self) -> None:
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.store_dir = tempfile.mkdtemp(prefix="mcf_two_ranks_")
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, self.world, self.store_dir, self.jobs[r], self.results),
                                  daemon=True) for r in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 900.0) -> list:
        """fn(rank, world, *args) on both ranks at once (fn importable by name); the return values by rank."""
        if self.procs is None:
            self._start()
        self.count += 1
        for q in self.jobs:
            q.put((self.count, fn, args))
        values, errors = {}, {}
        deadline = time.monotonic() + timeout
        grace = None  # once a rank failed, the other gets a minute: it may be stuck waiting for its peer
        while len(values) + len(errors) < self.world and time.monotonic() < min(deadline, grace or deadline):
            try:
                n, rank, ok, value = self.results.get(timeout=5.0)
            except queue.Empty:
                if any(p.exitcode is not None for p in self.procs):  # a rank died (killed, crashed)
                    break
                continue
            if n == self.count:
                (values if ok else errors)[rank] = value
                grace = grace or (None if ok else time.monotonic() + 60.0)
        if errors or len(values) < self.world:
            self.close()
            missing = sorted(set(range(self.world)) - set(values) - set(errors))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}" +
                                 (f", no answer from ranks {missing}" if missing else "") + ":\n" +
                                 "\n".join(errors.values()))
        return [values[r] for r in range(self.world)]

    def close(self) -> None:
        """Stop both ranks: killed, since a rank holds nothing that needs an orderly end (a clean
        shutdown of the group and interpreter took ~10 s under load)."""
        if self.procs is None:
            return
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()
        self.procs = None
        shutil.rmtree(self.store_dir, ignore_errors=True)
