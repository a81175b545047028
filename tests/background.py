"""Work a few tests wait for, started as soon as the session knows its tests, so that it runs beside the
other tests instead of adding its minutes after them (test mechanics, not a test).

    start(name, fn, *args)   fn(*args) in a thread, once per session
    result(name)             waits for it: fn's return value, or its exception raised here
    run(cmd, ...)            subprocess.run at a lower CPU priority (nice 10), in its own process group,
                             killed when the session ends first
    workdir()                a folder for the session's background files, removed at exit

conftest calls each test module's `start_background(items)` with its selected tests; the tests that
read a result carry the `late` marker (or `fresh`), and conftest runs them after all the others.
Why nice 10: the work then takes the CPU time the foreground tests leave idle (waiting on a
subprocess, one-threaded Python) and yields a core whenever they need both, so it never slows them.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading

NICE = ["nice", "-n", "10"] if shutil.which("nice") else []

_JOBS: dict = {}    # name -> {"thread", and "value" or "error" once it ends}
_PROCS: list = []   # live subprocesses started by run()
_DIR: list = []     # the session's work folder, once made


def start(name: str, fn, *args) -> None:
    """Run fn(*args) in a daemon thread named `name`, unless a job of that name was already started."""
    if name in _JOBS:
        return
    job: dict = {}

    def work():
        try:
            job["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the test that reads the result
            job["error"] = e

    job["thread"] = threading.Thread(target=work, name=f"background {name}", daemon=True)
    _JOBS[name] = job
    job["thread"].start()


def started(name: str) -> bool:
    return name in _JOBS


def result(name: str):
    """Wait for the job `name`; its value, or the exception it ended with."""
    job = _JOBS[name]
    job["thread"].join()
    if "error" in job:
        raise job["error"]
    return job["value"]


def run(cmd: list[str], timeout: float = 2400, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kw), niced, its whole process group killed
    at its timeout (the result then has returncode -9 and whatever it printed) or at the session's end."""
    p = subprocess.Popen(NICE + list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    _PROCS.append(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        err += f"\n[background.run: killed after {timeout:.0f} s]"
    finally:
        _PROCS.remove(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def workdir() -> str:
    if not _DIR:
        _DIR.append(tempfile.mkdtemp(prefix="mcf_tests_bg_"))
    return _DIR[0]


@atexit.register
def _stop():
    for p in list(_PROCS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for d in _DIR:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["start", "started", "result", "run", "workdir", "NICE"]
