"""pretrain's pre-flight memory check: skipped on a CPU or when switched off, a one-line refusal with the fix
on a GPU the setting cannot fit, before the run folder exists. The GPU is simulated (no CUDA here)."""
import pytest
import torch

from mcf_fast.plan import check, sheet
from mcf_fast.plan.check import WontFit, check_fits, gpu_kind
from mcf_fast.train.config import from_preset

MiB = 1 << 20


@pytest.fixture
def small_gpu(monkeypatch):
    """A CUDA device with `free` bytes (settable), named like an H100."""
    state = {"free": 64 * MiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (state["free"], 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return state


def test_no_check_on_a_cpu_or_when_switched_off(monkeypatch):
    """CPU devices and --run.memory_check false never trace anything."""
    def boom(*a, **k):
        raise AssertionError("traced")
    monkeypatch.setattr(sheet, "traced", boom)
    cfg = from_preset("demo")
    assert check_fits(cfg, 1, "cpu") is None
    cfg.run.memory_check = False
    assert check_fits(cfg, 1, torch.device("cuda", 0)) is None


def test_a_step_the_trace_cannot_follow_is_let_through(small_gpu, monkeypatch, caplog):
    """A failure inside the trace never stops a run: the check logs why it was skipped and returns."""
    def broken(*a, **k):
        raise RuntimeError("no fake kernel for some new op")
    monkeypatch.setattr(sheet, "traced", broken)
    assert check_fits(from_preset("demo"), 1, torch.device("cuda", 0)) is None
    assert "pre-flight memory check skipped" in caplog.text and "no fake kernel" in caplog.text


def test_refusal_names_the_switches_that_fit(small_gpu):
    """A GPU too small for the demo step: WontFit, one line, with traced switches and the way to skip it."""
    cfg = from_preset("demo")
    target = sheet.Target(gpu="h100", context_in_use=True)
    need = sheet.memory_sheet(sheet.traced(cfg, "bf16"), cfg, target, "bf16", sheet.machine_for(target, "bf16"))
    small_gpu["free"] = int(need["needed"] * 0.85)
    with pytest.raises(WontFit) as e:
        check_fits(cfg, 1, torch.device("cuda", 0))
    msg = str(e.value)
    assert "\n" not in msg and "GiB per GPU" in msg and "--run.memory_check false" in msg
    assert "--model.teacher_grad_ckpt true" in msg or "--optim.batch_size" in msg
    small_gpu["free"] = 80 << 30
    assert check_fits(cfg, 1, torch.device("cuda", 0)) is None


def test_pretrain_refuses_before_the_run_folder_exists(small_gpu, monkeypatch, tmp_path, capsys):
    """python -m mcf_fast.pretrain on a GPU the setting cannot fit: exit 2, one line, nothing written."""
    from mcf_fast import pretrain
    from mcf_fast.train import loop
    from mcf_fast.train.runtime import Runtime
    monkeypatch.setattr(loop, "init_runtime", lambda *a, **k: Runtime(torch.device("cuda", 0), "bf16", 0, 1, 0))
    # just short of what the demo step needs: the first switches traced already fit (with less room,
    # every switch and their combinations are traced, a dozen traces, with the same refusal)
    cfg, target = from_preset("demo"), sheet.Target(gpu="h100", context_in_use=True)
    small_gpu["free"] = int(sheet.memory_sheet(sheet.traced(cfg, "bf16"), cfg, target, "bf16",
                                               sheet.machine_for(target, "bf16"))["needed"] * 0.85)
    # the preset's own --out (in a scratch folder): the run's config is then the preset's, whose traces the
    # check shares (memoised) with the test above
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "demo"
    code = pretrain.main(["--preset", "demo", "--out", "runs/demo"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not (tmp_path / "runs").exists()
    assert err.startswith("python -m mcf_fast.pretrain: error: this setting needs") and len(err.strip().splitlines()) == 1


def test_memory_check_is_a_run_field():
    """--run.memory_check takes true/false; other values are refused."""
    from mcf_fast.train.cli import parse_args
    cfg, _ = parse_args(["--preset", "demo", "--run.memory_check", "false"])
    assert cfg.run.memory_check is False
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "demo", "--run.memory_check", "maybe"])
    assert e.value.code == 2


def test_device_names_map_to_the_sheet_machines():
    """The speed anchors follow the device's name; an unknown one plans like an H100."""
    assert gpu_kind("NVIDIA H200") == "h200" and gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_kind("NVIDIA L40S") == "h100" and check.gpu_kind("NVIDIA H100 PCIe") == "h100"
