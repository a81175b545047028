"""DIR/report.json and DIR/report.md of the device check, rewritten after every step."""
import json
import os
import platform
import subprocess
import sys
import time

from ..tables import md_table
from . import prep
from .predict import NO_PLAN


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
                ("predicted (the cost sheet)", "l", lambda r: r.get("predicted") or "-"),
                ("result", "l", lambda r: r["summary"])]
BANDWIDTH_COLUMNS = [("op", "l", lambda k: k["op"]), ("shape", "l", lambda k: k["shape"]),
                     ("dtype", "l", lambda k: k["dtype"]), ("bytes", "r", lambda k: f"{k['bytes']:,}"),
                     ("ms", "r", lambda k: f"{k['ms']:.3f}"), ("GB/s", "r", lambda k: f"{k['gb_per_s']:.0f}"),
                     ("of copy", "r", lambda k: f"{k['fraction_of_copy']:.0%}")]



def _value(unit: str, v) -> str:
    return {"rate": f"{v:,.0f}", "share": f"{v:.1%}", "bytes": f"{v / 2**30:.2f} GiB"}[unit]


def _predicted(r: dict) -> str:
    cell = _value(r["unit"], r["predicted"])
    if r["low"] is not None:
        cell += f" ({_value(r['unit'], r['low'])} to {_value(r['unit'], r['high'])})"
    if r["needed"] is not None:
        cell += f"; needs {r['needed'] / 2**30:.2f} of {r['capacity'] / 2**30:.1f}"
    return cell


def _ratio(r: dict) -> str:
    if r["ratio"] is None:
        return "-"
    return f"{r['ratio']:.2f}x" + ("" if r["in_range"] is None else " (in range)" if r["in_range"] else " (OUT of range)")


# The sheet beside the measurement: predicted = the likely value (low to high: the sheet's MFU range).
CALIBRATION_COLUMNS = [("run", "l", lambda r: r["run"]), ("quantity", "l", lambda r: r["quantity"]),
                       ("predicted", "r", _predicted),
                       ("measured", "r", lambda r: "-" if r["measured"] is None else _value(r["unit"], r["measured"])),
                       ("measured / predicted", "r", _ratio), ("note", "l", lambda r: r["note"])]


def calibration_md(rows: list[dict], plan: dict | None) -> list[str]:
    """The 'predicted vs measured' section: what the sheet assumed and the table."""
    if not rows:
        return ["", "## predicted vs measured", "", NO_PLAN + "."]
    return ["", "## predicted vs measured", "",
            f"Predicted: the cost sheet of `python -m mcf_fast.plan` (`plan_sheet`) for one {plan['predictions'][0]['machine']}"
            f" ({plan['gpu']['why']}), one process, made on the CPU before any measurement (the training step "
            "traced on fake tensors). Speed: the likely "
            "MFU, in brackets the sheet's low to high range, both as shares of the datasheet peak; measured MFU = "
            "measured images/s x the sheet's FLOPs per image / that peak. Memory: bytes allocated at the peak "
            "(the sheet's 'needed' adds its fragmentation and context headroom, which this kit does not measure).",
            "", md_table(CALIBRATION_COLUMNS, rows)]


def to_markdown(rep: dict) -> str:
    lines = ["# mcf_fast device check", "",
             f"`{rep['command']}`: budget {rep['budget_s']:.0f} s, wall {rep['wall_s']:.0f} s"
             f"{' (still running)' if not rep['finished'] else ''}. Every number below was measured in this run, "
             "except the predictions of the cost sheet, made before the measurements.", "",
             md_table(MACHINE_COLUMNS, rep["machine"].items()), "", md_table(STEP_COLUMNS, rep["steps"])]
    plan = next((r for r in rep["steps"] if r["step"] == "plan"), None)
    lines += calibration_md(rep.get("predicted_vs_measured") or [], plan)
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
