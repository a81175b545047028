"""DIR/report.json and DIR/report.md of the device check, rewritten after every step."""
import json
import os
import platform
import subprocess
import sys
import time

from ..tables import md_table
from . import prep


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception as e:  # noqa: BLE001 - a missing or broken package is what the report must say
        return f"not importable ({type(e).__name__})"


def _cmd_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        return (out.stdout.strip().splitlines() or ["?"])[-1] if out.returncode == 0 else f"exit {out.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def machine() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    m = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "host": platform.node(),
         "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "triton": _version("triton"), "git_sha": prep.git_sha(),
         "gpu": torch.cuda.get_device_name(0) if cuda else "none (no CUDA device)",
         "nvcc": _cmd_line([os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "--version"]),
         "driver": _cmd_line(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"])
         if cuda else "-"}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        m.update(gpu_sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}")
    return m


# Each table is a list of (header, align, cell) columns: a new column, e.g. a predicted value beside a
# measured one, is one more tuple here.
MACHINE_COLUMNS = [("machine", "l", lambda kv: kv[0]), ("", "l", lambda kv: kv[1])]
STEP_COLUMNS = [("step", "l", lambda r: r["step"]), ("what", "l", lambda r: r["what"]),
                ("status", "l", lambda r: f"**{r['status']}**"),
                ("seconds (box)", "r", lambda r: f"{r['seconds']:.0f} ({r['time_box_s']:.0f})"),
                ("result", "l", lambda r: r["summary"])]
BANDWIDTH_COLUMNS = [("op", "l", lambda k: k["op"]), ("shape", "l", lambda k: k["shape"]),
                     ("dtype", "l", lambda k: k["dtype"]), ("bytes", "r", lambda k: f"{k['bytes']:,}"),
                     ("ms", "r", lambda k: f"{k['ms']:.3f}"), ("GB/s", "r", lambda k: f"{k['gb_per_s']:.0f}"),
                     ("of copy", "r", lambda k: f"{k['fraction_of_copy']:.0%}")]


def to_markdown(rep: dict) -> str:
    lines = ["# mcf_fast device check", "",
             f"`{rep['command']}`: budget {rep['budget_s']:.0f} s, wall {rep['wall_s']:.0f} s"
             f"{' (still running)' if not rep['finished'] else ''}. Every number below was measured in this run.", "",
             md_table(MACHINE_COLUMNS, rep["machine"].items()), "", md_table(STEP_COLUMNS, rep["steps"])]
    for r in rep["steps"]:
        if r.get("report_md"):
            lines += ["", f"## {r['step']}: the benchmarks' report", "", r["report_md"]]
        if r.get("kernels"):
            lines += ["", "## bandwidth", "", md_table(BANDWIDTH_COLUMNS, r["kernels"]),
                      f"\nDevice-to-device copy: {r['copy']['gb_per_s']:.0f} GB/s (bytes read + written)."]
    return "\n".join(lines) + "\n"


def write(out: str, rep: dict) -> None:
    """Both files via a temporary name and a rename: a kill mid-write leaves the previous complete pair."""
    slim = dict(rep, steps=[{k: v for k, v in s.items() if k != "report_md"} for s in rep["steps"]])
    for name, text in (("report.json", json.dumps(slim, indent=1, default=str)), ("report.md", to_markdown(rep))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
