"""`python -m mcf_fast.eval paper`: both tasks from one checkpoint, resumable, one table against the paper."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from mcf_fast.eval.__main__ import main
from mcf_fast.eval.toydata import write_aflw19, write_lapa
from mcf_fast.model.vit import VisionTransformer, save_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--head-width", "8", "--no-progress",
        "--log-every", "1"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny exported encoder, a toy AFLW-19 folder and a toy LaPa folder."""
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(2)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), str(root / "enc"))
    write_aflw19(str(root / "aflw"), 14, 40, seed=1, train_count=9)
    write_lapa(str(root / "lapa"), {"train": 6, "val": 1, "test": 3}, 40, seed=1)
    return root


def _paper(sets, out, *extra):
    return main(["paper", "--encoder", str(sets / "enc"), "--aflw19", str(sets / "aflw"), "--lapa",
                 str(sets / "lapa"), "--out", str(out), *TINY, *extra])


def test_paper_resumes_and_ends_with_the_table(sets, tmp_path, capsys):
    """Stopped after 1 step it resumes to the end; the table has ours (best and last), the paper and FaRL,
    and the face counts; a finished task is not run again."""
    assert _paper(sets, tmp_path, "--max-steps", "2", "--stop-after", "1") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stopped_at"] == 1
    assert not os.path.exists(tmp_path / "paper.md")
    assert torch.load(tmp_path / "seed0" / "alignment" / "ckpt.pt", weights_only=True)["step"] == 1
    assert _paper(sets, tmp_path, "--max-steps", "2") == 0
    md = open(tmp_path / "paper.md").read()
    assert "| MCF paper (states FaRL's protocol) | 0.932 | 93.96 |" in capsys.readouterr().out  # also printed
    for s in ("| MCF paper (states FaRL's protocol) | 0.932 | 93.96 |",
              "| FaRL ep16 (FaRL README: best test epoch) | 0.943 | 93.88 |",
              "| FaRL ep16, last epoch (FaRL's logs) | 1.000 | 93.81 |", "this checkpoint, best test evaluation",
              "this checkpoint, last step", "Which row stands beside FaRL's and MCF's numbers: best",
              "best-of-test-epochs", "9 train faces, 5 test faces", "6 train images, 3 test images",
              "FaRL's downstream protocol", "FaRL's computation in every item"):
        assert s in md, s
    t = json.load(open(tmp_path / "paper.json"))
    ma = json.load(open(tmp_path / "seed0" / "alignment" / "metrics.json"))
    mp = json.load(open(tmp_path / "seed0" / "parsing" / "metrics.json"))
    assert t["this"] == [100 * ma["best"]["nme_diag"], 100 * mp["best"]["f1_mean"]]
    assert t["rows"]["last"]["alignment"]["mean"] == 100 * ma["nme_diag"]
    assert ma["run"]["protocol"] == mp["run"]["protocol"] == "farl" and mp["run"]["warp_factor"] == 0.8
    lines = len(open(tmp_path / "seed0" / "parsing" / "metrics.jsonl").readlines())
    assert _paper(sets, tmp_path, "--max-steps", "2") == 0  # both done: nothing retrains
    assert len(open(tmp_path / "seed0" / "parsing" / "metrics.jsonl").readlines()) == lines
    assert json.load(open(tmp_path / "paper.json"))["this"] == t["this"]


def test_paper_errors_name_the_problem(sets, tmp_path, capsys):
    """A missing LaPa folder, a refused protocol value and a GPU that is not there exit with a message, not a
    traceback, before anything is written."""
    assert main(["paper", "--encoder", str(sets / "enc"), "--aflw19", str(sets / "aflw"), "--lapa",
                 str(tmp_path / "no_lapa"), "--out", str(tmp_path / "o"), *TINY, "--max-steps", "1"]) == 2
    assert "no_lapa" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _paper(sets, tmp_path / "p", "--protocol", "resize-whole")
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert _paper(sets, tmp_path / "q", "--device", "cuda") == 2
        assert "torch sees no GPU" in capsys.readouterr().err and not os.path.exists(tmp_path / "q")


def test_paper_on_the_project_generator_sets(sets, tmp_path, capsys):
    """`paper` runs end to end on mcf_fast.data.synthetic's AFLW-19 and LaPa layouts (FaRL's five points included)."""
    from mcf_fast.data.synthetic import main as synth
    for fmt in ("aflw19", "lapa"):
        synth(["--out", str(tmp_path / fmt), "--num", "10", "--size", "48", "--format", fmt, "--seed", "3"])
    capsys.readouterr()
    assert main(["paper", "--encoder", str(sets / "enc"), "--aflw19", str(tmp_path / "aflw19"), "--lapa",
                 str(tmp_path / "lapa"), "--out", str(tmp_path / "out"), *TINY, "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| this checkpoint, best" in out and "8 train faces, 2 test faces" in out and "8 train images, 1 test" in out


def test_module_entry_point_lists_paper():
    """`python -m mcf_fast.eval paper --help` names the three inputs."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "mcf_fast.eval", "paper", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and all(f in r.stdout for f in ("--encoder", "--aflw19", "--lapa", "--out"))


def test_paper_seeds_report_mean_sd_and_each_run_resumable_per_seed(sets, tmp_path, capsys):
    """--seeds 2: one folder pair per seed, mean +- sd of best and of last over the seeds, each run listed;
    raising to --seeds 3 runs only the new seed."""
    assert _paper(sets, tmp_path, "--max-steps", "2", "--seeds", "2") == 0
    t = json.load(open(tmp_path / "paper.json"))
    assert t["seeds"] == [0, 1]
    for which in ("best", "last"):
        vals = [100 * json.load(open(tmp_path / f"seed{s}" / "alignment" / "metrics.json"))[which]["nme_diag"]
                for s in (0, 1)]
        agg = t["rows"][which]["alignment"]
        assert [r["value"] for r in agg["runs"]] == vals
        assert agg["mean"] == pytest.approx(statistics.fmean(vals)) and agg["sd"] == pytest.approx(statistics.stdev(vals))
    md = open(tmp_path / "paper.md").read()
    assert "mean ± sd of 2 seeds" in md and " ± " in md and "| 1 | " in md and "- computation: FaRL's" in md
    before = len(open(tmp_path / "seed0" / "parsing" / "metrics.jsonl").readlines())
    capsys.readouterr()
    assert _paper(sets, tmp_path, "--max-steps", "2", "--seeds", "3") == 0
    assert len(open(tmp_path / "seed0" / "parsing" / "metrics.jsonl").readlines()) == before
    assert json.load(open(tmp_path / "paper.json"))["seeds"] == [0, 1, 2]
    assert os.path.exists(tmp_path / "seed2" / "parsing" / "done.json")


def test_new_weights_at_the_same_path_are_evaluated_again(sets, tmp_path, capsys):
    """paper keys finished tasks by the encoder's content: new weights written over the old export are
    fine-tuned and scored afresh (the old run folders start over); the single-task command refuses to resume
    a checkpoint of other weights, naming the digest."""
    enc = tmp_path / "enc"
    torch.manual_seed(5)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), str(enc))
    args = ["paper", "--encoder", str(enc), "--aflw19", str(sets / "aflw"), "--lapa", str(sets / "lapa"),
            "--out", str(tmp_path / "p"), *TINY, "--max-steps", "1"]
    assert main(args) == 0
    first = json.load(open(tmp_path / "p" / "paper.json"))
    torch.manual_seed(6)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), str(enc))
    assert main(args) == 0
    second = json.load(open(tmp_path / "p" / "paper.json"))
    assert second["encoder_sha256"] != first["encoder_sha256"]
    ma = json.load(open(tmp_path / "p" / "seed0" / "alignment" / "metrics.json"))
    assert ma["run"]["encoder_sha256"] == second["encoder_sha256"] and second["this"] != first["this"]
    single = ["alignment", "--data", str(sets / "aflw"), "--encoder", str(enc), "--out", str(tmp_path / "s"),
              *TINY, "--max-steps", "2", "--stop-after", "1"]
    assert main(single) == 0
    torch.manual_seed(7)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), str(enc))
    capsys.readouterr()
    assert main(single[:-2]) == 2
    assert "encoder_digest" in capsys.readouterr().err
