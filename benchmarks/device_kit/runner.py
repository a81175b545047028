"""Time-boxed steps: each runs its commands as child processes with a deadline, logs to one file, and
its result lands in the report as soon as it finishes (a later crash or timeout loses nothing)."""
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

NO_CUDA = "skipped: no CUDA device"


@dataclass
class Step:
    name: str
    what: str               # one line for the report
    cap_s: float            # at most this long
    floor_s: float          # kept free for this step by the steps before it
    fn: Callable            # fn(ctx, deadline) -> dict(status=..., summary=..., **data)
    needs_cuda: bool = True


@dataclass
class Context:
    root: str
    out: str
    work: str
    env: dict
    log_path: str
    cuda: bool
    python: str
    results: dict = field(default_factory=dict)
    plan_gpu: str = "auto"  # the machine the plan step predicts for (predict.gpu_for)

    def log(self, text: str):
        with open(self.log_path, "a") as f:
            f.write(text)


def run_cmd(ctx: Context, name: str, cmd: list[str], deadline: float, env: dict | None = None,
            cwd: str | None = None) -> tuple[int | None, str]:
    """(exit status or None on timeout, combined output); the whole process group dies at the deadline."""
    timeout = max(1.0, deadline - time.monotonic())
    ctx.log(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)\n")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd or ctx.root, env=env or ctx.env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        rc = None
    ctx.log(out + f"\n===== {name}: exit {rc} after {time.monotonic() - t0:.1f} s\n")
    return rc, out


def plan_deadlines(steps: list[Step], budget_s: float) -> list[float]:
    """Each step's own share: its cap, less what the later steps' floors need of the budget."""
    return [min(s.cap_s, budget_s - sum(t.floor_s for t in steps[i + 1:])) for i, s in enumerate(steps)]


def run_steps(ctx: Context, steps: list[Step], budget_s: float, on_result: Callable) -> None:
    t_start = time.monotonic()
    for i, step in enumerate(steps):
        t0 = time.monotonic()
        left = budget_s - (t0 - t_start)
        reserve = sum(t.floor_s for t in steps[i + 1:])
        allowed = min(step.cap_s, left - reserve)
        if step.needs_cuda and not ctx.cuda:
            res = {"status": "skipped", "summary": NO_CUDA}
        elif allowed < 5:
            res = {"status": "skipped", "summary": f"skipped: the budget is spent ({left:.0f} s left)"}
        else:
            try:
                res = step.fn(ctx, t0 + allowed)
            except Exception as e:  # a broken step must not take the report with it
                res = {"status": "failed", "summary": f"crashed: {type(e).__name__}: {e}"}
            if time.monotonic() > t0 + allowed and res.get("status") == "passed":
                res["summary"] += " (over its time box)"
        res.update(step=step.name, what=step.what, seconds=round(time.monotonic() - t0, 1),
                   time_box_s=round(max(allowed, 0), 1))
        ctx.results[step.name] = res
        on_result()
