"""Work a few tests wait for, started as soon as the session knows its tests, so that it runs in the CPU
time the other tests leave idle instead of adding its minutes after them (test mechanics, not a test).

    start(name, fn, *args, cost=S)  queue fn(*args) once per session; WORKERS jobs run at a time, the
                                    costliest first; begin() lets them start once all are queued
    result(name)                    waits for it: fn's return value, or its exception raised here
    run(cmd, ...)                   subprocess.run at the idle CPU priority, in its own process group,
                                    killed at its timeout or when the session ends first
    overdue(started, timeout)       the timeout's clock: it runs from when a test first waits for a
                                    result (until then the foreground may leave the job no CPU)
    popen(cmd, ...)                 the same for a Popen
    workdir()                       a folder for the session's background files, removed at exit

conftest calls each test module's `start_background(items)` with its selected tests, then begin(); the
tests that read the results carry the `late` marker (or `fresh`) and conftest runs them after all the
others.

Why the idle priority (SCHED_IDLE, else nice 19): the work then runs only on a core no foreground test
wants, so it does not slow them (a 35-s set of plan tests took as long beside two idle-priority busy
loops as alone). OMP_WAIT_POLICY=PASSIVE keeps the background's own torch threads from spinning on a
core while their partner waits for one. Only subprocesses run here, never torch work in a thread: the
foreground tests own the process's RNG and thread settings.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time

if shutil.which("chrt"):
    IDLE = ["chrt", "--idle", "0"]
elif shutil.which("nice"):
    IDLE = ["nice", "-n", "19"]
else:
    IDLE = []
WORKERS = 2  # two jobs at a time: both cores once the foreground waits, without crowding them before
# The environment as the session started: a job runs while foreground tests may have changed os.environ.
ENV = dict(os.environ)

_JOBS: dict = {}              # name -> {"done": Event, and "value" or "error"}
_QUEUE: queue.PriorityQueue = queue.PriorityQueue()  # (-cost, order queued, job, fn, args)
_BEGUN: list = []             # non-empty once the workers may start
_THREADS: list = []
_PROCS: list = []             # subprocesses started by popen() and run()
_DIR: list = []               # the session's work folder, once made
_WAITED: list = []            # when a test first waited for a result (the foreground then leaves cores free)


def _worker() -> None:
    while True:
        _, _, job, fn, args = _QUEUE.get()
        try:
            job["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the test that reads the result
            job["error"] = e
        job["done"].set()


def _workers() -> None:
    while len(_THREADS) < WORKERS:
        _THREADS.append(threading.Thread(target=_worker, name=f"background {len(_THREADS)}", daemon=True))
        _THREADS[-1].start()


def start(name: str, fn, *args, cost: float = 0.0) -> None:
    """Queue fn(*args) as the job `name`, unless a job of that name was already queued. `cost`: its rough
    CPU-seconds; the costliest queued job runs first (the session ends with the last job: long ones first
    keep the end short)."""
    if name in _JOBS:
        return
    _JOBS[name] = job = {"done": threading.Event()}
    _QUEUE.put((-cost, len(_JOBS), job, fn, args))
    if _BEGUN:
        _workers()


def begin() -> None:
    """Start the workers (conftest, once every job of the session is queued; a result() asked for also does)."""
    _BEGUN.append(True)
    _workers()


def started(name: str) -> bool:
    return name in _JOBS


def result(name: str):
    """Wait for the job `name`; its value, or the exception it ended with."""
    job = _JOBS[name]
    if not _WAITED:
        _WAITED.append(time.monotonic())
    begin()
    job["done"].wait()
    if "error" in job:
        raise job["error"]
    return job["value"]


def popen(cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kw) at the idle priority, in its own process group (so killing it kills all
    it started), killed when the session ends first; `env` defaults to ENV."""
    env = dict(ENV if env is None else env)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = subprocess.Popen(IDLE + list(cmd), start_new_session=True, env=env, **kw)
    _PROCS.append(p)
    return p


def overdue(started: float, timeout: float) -> bool:
    """Has a job started at `started` (time.monotonic()) had `timeout` seconds of fair running? Counted
    from when a test first waited for a result, if later: until then the foreground tests may take every
    core and the idle priority may leave the job none."""
    return time.monotonic() - max(started, _WAITED[0] if _WAITED else float("inf")) > timeout


def run(cmd: list[str], timeout: float = 2400, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kw) through popen(); its whole process group is
    killed after `timeout` seconds of fair running (overdue(); the result then has returncode -9 and
    whatever it printed)."""
    p = popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    started = time.monotonic()
    while True:
        try:
            out, err = p.communicate(timeout=5.0)
            break
        except subprocess.TimeoutExpired:  # retrying loses no output
            if overdue(started, timeout):
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
                err += f"\n[background.run: killed after {timeout:.0f} s of fair running]"
                break
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def workdir() -> str:
    if not _DIR:
        _DIR.append(tempfile.mkdtemp(prefix="mcf_tests_bg_"))
    return _DIR[0]


@atexit.register
def _stop():
    for p in _PROCS:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
    for d in _DIR:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["start", "begin", "started", "result", "overdue", "popen", "run", "workdir", "ENV", "IDLE", "WORKERS"]
