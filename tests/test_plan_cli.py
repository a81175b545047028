"""`python -m mcf_fast.plan`: the paper run's sheet, bad input, fixes for a setting that does not fit."""
import json

import pytest

from mcf_fast.plan import cli, sheet
from mcf_fast.plan.table import render
from mcf_fast.train.config import from_preset

PAPER = ["--preset", "vit-b-paper", "--model.teacher", "random", "--gpus", "8", "--gpu", "h100",
         "--images", "20000000", "--epochs", "16"]


def _run(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_paper_run_sheet(capsys):
    """The paper's run on 8 H100: 78,112 steps (full steps only, as the loop counts), fits with room,
    hours from the counted FLOPs at each MFU, collectives and loader cores per GPU, checkpoint disk;
    JSON and table say the same."""
    code, out, _ = _run(capsys, PAPER + ["--loader-rate", "1000", "--json"])
    s = json.loads(out)
    assert code == 0 and s["run"]["world"] == 8 and s["run"]["optimizer_steps"] == 20_000_000 // (64 * 8) // 8 * 16
    assert s["memory"]["fits"] and s["memory"]["needed"] < s["memory"]["capacity"] / 4
    fpi = s["flops"]["per_image"]
    assert sum(s["flops"]["by_part"].values()) == pytest.approx(fpi)
    for name, r in s["speed"]["range"].items():
        assert r["images_per_s_per_gpu"] == pytest.approx(r["mfu"] * 989e12 / fpi)
        assert r["hours"] == pytest.approx(s["run"]["optimizer_steps"] * 4096 / (r["images_per_s_per_gpu"] * 8) / 3600)
        assert s["loader"]["cores_per_gpu"][name] == pytest.approx(r["images_per_s_per_gpu"] / 1000)
    low, likely, high = (s["speed"]["range"][k]["mfu"] for k in ("low", "likely", "high"))
    assert low < likely < high
    assert s["comms"]["per_step"]["total"] > 0 and s["storage"]["checkpoint_disk"] == 3 * s["storage"]["checkpoint"]
    code, text, _ = _run(capsys, PAPER + ["--loader-rate", "1000"])
    for block in ("Work per image", "Memory per GPU", "Speed per GPU", "Collectives", "Loader", "Disk", "fits"):
        assert block in text


@pytest.mark.parametrize("argv, says", [
    (["--gpus", "0"], "--gpus 0: must be >= 1"),
    (["--gpu", "v100"], "invalid choice"),
    (["--model.dept", "3"], "did you mean --model.depth"),
    (["--epochs", "nan"], "--epochs nan: must be > 0"),
    (["--gpu", "cpu", "--run.precision", "fp16"], "fp16"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    """Each mistake is one line on stderr naming it, exit status 2, nothing on stdout."""
    base = ["--preset", "demo", "--loader-rate", "100"]
    try:
        code = cli.main(base + argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code == 2 and says in out.err and len(out.err.strip().splitlines()) == 1 and out.out == ""


def test_help_shows_the_plan_and_the_pretrain_options(capsys):
    """--help lists the cluster/job options beside every pretrain option; --print-config prints the
    resolved config (--epochs included) without tracing."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--gpu" in text and "--images" in text and "--model.teacher_grad_ckpt" in text
    code, out, _ = _run(capsys, ["--preset", "vit-s", "--epochs", "3", "--print-config"])
    assert code == 0 and json.loads(out)["optim"]["epochs"] == 3.0


def test_absent_teacher_checkpoint_is_planned_with_the_configured_architecture(capsys):
    """A teacher file that lives only on the cluster: the sheet uses --model.teacher_* and says so."""
    code, text, _ = _run(capsys, ["--preset", "demo", "--model.teacher", "checkpoint:/cluster/moco.pth",
                                  "--loader-rate", "100"])
    assert code == 0 and "/cluster/moco.pth is not on this machine" in text


def test_a_setting_that_does_not_fit_gets_traced_fixes():
    """On a device too small for it the sheet says DOES NOT FIT and lists switches, each with its traced
    memory, whether it fits, its extra work; halving the batch stops at the first batch that fits."""
    cfg = from_preset("demo")
    base = sheet.plan_sheet(cfg, sheet.Target(gpu="h100", loader_rate=100.0))
    need = base["memory"]["needed"]
    s = sheet.plan_sheet(cfg, sheet.Target(gpu="h100", loader_rate=100.0, memory_bytes=need - 1))
    assert not s["memory"]["fits"] and "DOES NOT FIT" in render(s)
    switches = {f["switch"]: f for f in s["fixes"]}
    ckpt = switches["--model.teacher_grad_ckpt true"]
    assert ckpt["fits"] and ckpt["needed"] < need and ckpt["flops_change"] > 0
    halved = [f for f in s["fixes"] if f["switch"].startswith("--optim.batch_size")]
    assert halved[0]["switch"] == "--optim.batch_size 16 --optim.accum_steps 2" and halved[-1]["fits"]
    assert all(not f["fits"] for f in halved[:-1]) and abs(halved[0]["flops_change"]) < 1e-9


def test_cpu_target_plans_for_this_machine(capsys):
    """--gpu cpu: this machine's RAM and measured matmul rate, no collectives; --max-steps sets the length."""
    code, out, _ = _run(capsys, ["--preset", "demo", "--gpu", "cpu", "--loader-rate", "100", "--json"])
    s = json.loads(out)
    assert code == 0 and s["run"]["machine"] == "this CPU" and s["comms"]["per_step"]["total"] == 0
    assert s["run"]["optimizer_steps"] == 150  # the demo preset's max_steps
    assert s["speed"]["peak_flops"] > 0 and "measured here" in s["speed"]["peak_source"]


def test_checkpoint_teacher_is_planned_at_its_own_size(tmp_path, capsys):
    """A MoCo v3 teacher file here: its shapes set the teacher's cost, as a random teacher of that size."""
    import torch

    from mcf_fast.model.vit import VisionTransformer
    vit = VisionTransformer(64, 8, 3, 96, 3, 4)
    path = tmp_path / "moco.pth"
    torch.save({"state_dict": {"module.base_encoder." + k: v for k, v in vit.state_dict().items()}}, path)
    common = ["--preset", "demo", "--model.teacher_layers", "0,1,2", "--model.teacher_num_heads", "4",
              "--loader-rate", "100", "--json"]
    _, out, _ = _run(capsys, common + ["--model.teacher", f"checkpoint:{path}"])
    from_file = json.loads(out)
    _, out, _ = _run(capsys, common + ["--model.teacher", "random", "--model.teacher_embed_dim", "96",
                                       "--model.teacher_depth", "3"])
    assert from_file["flops"] == json.loads(out)["flops"] and not from_file["trace"]["notes"]


def test_loader_rate_is_measured_on_one_core():
    """The loader's own decode + augment on synthetic face JPEGs: a positive rate per core, the JPEG size,
    and OpenCV's thread count given back afterwards."""
    from mcf_fast.data.config import DataConfig
    from mcf_fast.plan import loader
    cv2 = pytest.importorskip("cv2")
    threads = cv2.getNumThreads()
    r = loader.measure_rate(DataConfig(img_size=64), 80, seconds=0.05)
    assert r["images_per_s_per_core"] > 0 and r["bytes_per_image"] > 0 and r["measured"]
    assert cv2.getNumThreads() == threads
    assert loader.cores_needed(2 * r["images_per_s_per_core"], r) == pytest.approx(2.0)
