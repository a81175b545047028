"""`python tests/peak_of.py PEAK_FILE MODULE ARGS...` runs `python -m MODULE ARGS...` in this process and,
at exit, writes its peak resident memory in bytes (VmHWM) to PEAK_FILE (test mechanics, not a test).

Why not the ru_maxrss that wait4 returns for the child: Linux carries the parent's high-water mark into a
child that forks and execs, so a command started by a 2 GB test runner would report 2 GB whatever it used.
"""
import atexit
import os
import runpy
import sys

sys.path[0] = os.getcwd()  # as `python -m` has it: the module must not see this tests folder's files
from mcf_fast.procmem import peak_rss_bytes  # noqa: E402


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(peak_rss_bytes()))


if __name__ == "__main__":
    peak_file, module, *args = sys.argv[1:]
    atexit.register(_write, peak_file)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
