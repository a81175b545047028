"""DIR/report.json and DIR/report.md of the device check, rewritten after every step."""
import json
import os
import platform
import subprocess
import sys
import time

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


def _cell(s) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def to_markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# mcf_fast device check", "",
             f"`{rep['command']}`: budget {rep['budget_s']:.0f} s, wall {rep['wall_s']:.0f} s"
             f"{' (still running)' if not rep['finished'] else ''}. Every number below was measured in this run.", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in m.items()]
    lines += ["", "| step | what | status | seconds (box) | result |", "|---|---|---|---:|---|"]
    for r in rep["steps"]:
        lines.append(f"| {r['step']} | {_cell(r['what'])} | **{r['status']}** | {r['seconds']:.0f} ({r['time_box_s']:.0f})"
                     f" | {_cell(r['summary'])} |")
    for r in rep["steps"]:
        if r.get("report_md"):
            lines += ["", f"## {r['step']}: benchmarks/run.py's report", "", r["report_md"]]
        if r.get("kernels"):
            lines += ["", "## bandwidth", "", "| op | shape | dtype | bytes | ms | GB/s | of copy |",
                      "|---|---|---|---:|---:|---:|---:|"]
            lines += [f"| {k['op']} | {k['shape']} | {k['dtype']} | {k['bytes']:,} | {k['ms']:.3f} | {k['gb_per_s']:.0f}"
                      f" | {k['fraction_of_copy']:.0%} |" for k in r["kernels"]]
            lines.append(f"\nDevice-to-device copy: {r['copy']['gb_per_s']:.0f} GB/s (bytes read + written).")
    return "\n".join(lines) + "\n"


def write(out: str, rep: dict) -> None:
    """Both files via a temporary name and a rename: a kill mid-write leaves the previous complete pair."""
    slim = dict(rep, steps=[{k: v for k, v in s.items() if k != "report_md"} for s in rep["steps"]])
    for name, text in (("report.json", json.dumps(slim, indent=1, default=str)), ("report.md", to_markdown(rep))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
