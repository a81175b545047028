"""`python -m mcf_fast.eval` end to end on tiny data: artefacts, resume, errors, and the generator chain."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mcf_fast.eval.__main__ import main
from mcf_fast.eval.toydata import write_aflw19, write_lapa
from mcf_fast.model.vit import VisionTransformer, save_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--batch-size", "4", "--workers", "0", "--log-every", "1", "--head-width", "16", "--no-progress",
          "--num-viz", "3"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny exported encoder, an AFLW-19 folder and a LaPa folder."""
    root = tmp_path_factory.mktemp("evalsets")
    torch.manual_seed(1)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), str(root / "enc"))
    write_aflw19(str(root / "aflw"), 16, 48, seed=0, train_count=10)
    write_lapa(str(root / "lapa"), {"train": 8, "val": 2, "test": 4}, 40, seed=0)
    return root


def _run(task, data, enc, out, *extra):
    return main([task, "--data", str(data), "--encoder", str(enc), "--out", str(out), *COMMON, *extra])


def test_alignment_artefacts(sets, tmp_path):
    """alignment writes metrics.json with the six scores, metrics.md, a PNG, eval.log and metrics lines
    (training rows, one scoring per epoch of 3 steps, the final row)."""
    assert _run("alignment", sets / "aflw", sets / "enc" / "encoder.safetensors", tmp_path, "--max-steps", "3") == 0
    m = json.load(open(tmp_path / "metrics.json"))
    for k in ("nme_diag", "nme_box", "nme_inter_ocular", "nme_inter_pupil", "auc_box_7", "fr_box_7"):
        assert isinstance(m[k], float) and m[k] == m[k], k
    assert m["nme_box"] > m["nme_diag"] and m["num_images"] == 6 and m["run"]["steps"] == 3
    assert m["last"]["step"] == m["best"]["step"] == 3 and m["last"]["nme_diag"] == m["nme_diag"]
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3),
                                                      ("final", 3)] and lines[-1]["final"]
    assert "nme_diag" in open(tmp_path / "metrics.md").read()
    log = open(tmp_path / "eval.log").read()
    assert "step 3" in log and "memory estimate: alignment at 32 px, batch 4" in log and "last nme_diag" in log
    with Image.open(tmp_path / "predictions.png") as im:
        assert im.width > 0 and im.height > 0


def test_parsing_artefacts_frozen(sets, tmp_path):
    """parsing with a frozen backbone: per-class F1 and f1_mean; the encoder weights never change."""
    assert _run("parsing", sets / "lapa", sets / "enc", tmp_path, "--max-steps", "2", "--freeze-backbone",
                "--img-size", "48") == 0
    m = json.load(open(tmp_path / "metrics.json"))
    assert 0.0 <= m["f1_mean"] <= 1.0 and "f1_hair" in m and m["num_images"] == 4
    assert sum(map(sum, m["confusion"])) == 4 * 40 * 40  # every pixel at the original resolution
    from safetensors.torch import load_file
    enc = load_file(str(sets / "enc" / "encoder.safetensors"))
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(sd["encoder.blocks.1.attn.qkv.weight"], enc["blocks.1.attn.qkv.weight"])
    assert os.path.exists(tmp_path / "predictions.png") and os.path.exists(tmp_path / "metrics.md")


def test_resume_matches_uninterrupted_run(sets, tmp_path):
    """Stopping after 2 of 4 steps and rerunning gives bit-identical weights and scores."""
    enc = sets / "enc"
    args = ("--max-steps", "4", "--ckpt-every", "1")
    assert _run("alignment", sets / "aflw", enc, tmp_path / "a", *args) == 0
    assert _run("alignment", sets / "aflw", enc, tmp_path / "b", *args, "--stop-after", "2") == 0
    assert not os.path.exists(tmp_path / "b" / "metrics.json")
    assert _run("alignment", sets / "aflw", enc, tmp_path / "b", *args) == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma, mb = (json.load(open(tmp_path / d / "metrics.json")) for d in "ab")
    assert ma["nme_diag"] == mb["nme_diag"]
    # a different configuration must not silently continue someone else's run
    assert _run("alignment", sets / "aflw", enc, tmp_path / "b", "--max-steps", "4", "--lr", "1e-3") == 2


def test_random_baseline_same_arch_and_seeded(sets, tmp_path):
    """--encoder random takes the architecture from encoder.json; same seed -> same result."""
    js = sets / "enc" / "encoder.json"
    for d in ("r1", "r2"):
        assert _run("alignment", sets / "aflw", "random", tmp_path / d, "--arch", str(js), "--max-steps", "2") == 0
    r1, r2 = (json.load(open(tmp_path / d / "metrics.json")) for d in ("r1", "r2"))
    assert r1["nme_diag"] == r2["nme_diag"] and r1["run"]["arch"]["embed_dim"] == 32
    assert r1["run"]["encoder"] == "random"


def test_bad_inputs_exit_with_named_errors(sets, tmp_path, capsys):
    """Missing --arch for random, a wrong data folder and a wrong encoder path are reported, not raised."""
    assert _run("alignment", sets / "aflw", "random", tmp_path / "x", "--max-steps", "1") == 2
    assert "--arch" in capsys.readouterr().err
    assert _run("parsing", tmp_path / "no_such_lapa", sets / "enc", tmp_path / "y", "--max-steps", "1") == 2
    assert "no_such_lapa" in capsys.readouterr().err
    assert _run("alignment", sets / "aflw", tmp_path / "nope.safetensors", tmp_path / "z") == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_module_entry_point(sets, tmp_path):
    """`python -m mcf_fast.eval` runs as a program and prints the headline scores."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "mcf_fast.eval", "parsing", "--data", str(sets / "lapa"),
                        "--encoder", str(sets / "enc"), "--out", str(tmp_path), "--max-steps", "1", *COMMON],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "f1_mean" in json.loads(r.stdout)


def _synthetic_cli_ready():
    try:
        import mcf_fast.data.formats  # noqa: F401  (the generator's writers)
        import mcf_fast.data.synthetic  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _synthetic_cli_ready(), reason="mcf_fast.data.synthetic writers not available yet")
@pytest.mark.parametrize("fmt, task", [("aflw19", "alignment"), ("lapa", "parsing")])
def test_chain_with_project_generator(sets, tmp_path, fmt, task):
    """The project's synthetic generator writes a set the eval CLI reads and scores end to end."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    data = tmp_path / fmt
    r = subprocess.run([sys.executable, "-m", "mcf_fast.data.synthetic", "--out", str(data), "--num", "12",
                        "--size", "48", "--format", fmt, "--seed", "3"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _run(task, data, sets / "enc", tmp_path / "out", "--max-steps", "2") == 0
    m = json.load(open(tmp_path / "out" / "metrics.json"))
    assert m["num_images"] >= 1 and ("nme_diag" in m or "f1_mean" in m)


@pytest.mark.parametrize("task, data, protocol", [("parsing", "lapa", "resize-whole"),
                                                  ("alignment", "aflw", "square-crop")])
def test_simple_protocols_stay_available(sets, tmp_path, task, data, protocol):
    """The issue-8 paths run under their names, with their own defaults (cosine, layer decay, no EMA)."""
    assert _run(task, sets / data, sets / "enc", tmp_path, "--max-steps", "2", "--protocol", protocol) == 0
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["run"]["protocol"] == protocol and m["run"]["schedule"] == "cosine" and m["run"]["ema_decay"] == 0
    assert m["run"]["layer_decay"] == 0.75 and m["run"]["head_width"] == 16
    if task == "parsing":
        assert sum(map(sum, m["confusion"])) == 4 * 40 * 40
