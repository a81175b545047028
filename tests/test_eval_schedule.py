"""Scoring on a schedule: every evaluation logged, the last and the best reported with their steps, resume exact."""
import json

import pytest
import torch

from mcf_fast.eval.__main__ import main
from mcf_fast.eval.evaluation import EvalHistory, due
from mcf_fast.eval.runlog import keep_row, truncate_rows
from mcf_fast.eval.toydata import write_aflw19
from mcf_fast.model.vit import VisionTransformer, save_encoder

COMMON = ["--batch-size", "4", "--workers", "0", "--log-every", "1", "--head-width", "8", "--no-progress",
          "--num-viz", "1", "--img-size", "32"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny exported encoder and a toy AFLW-19 folder (8 train faces: an epoch is 2 steps at batch 4)."""
    root = tmp_path_factory.mktemp("sched")
    torch.manual_seed(3)
    save_encoder(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), str(root / "enc"))
    write_aflw19(str(root / "aflw"), 12, 40, seed=2, train_count=8)
    return root


def _run(sets, out, *extra):
    return main(["alignment", "--data", str(sets / "aflw"), "--encoder", str(sets / "enc"), "--out", str(out),
                 *COMMON, *extra])


def _rows(path):
    return [json.loads(s) for s in open(path)]


def test_history_picks_best_by_the_headline_and_keeps_last():
    """Lower NME / higher F1 wins, the earliest on a tie; NaN never wins; a rescoring replaces its step."""
    h = EvalHistory("alignment")
    for step, v in ((2, 0.3), (4, 0.1), (6, 0.1), (8, 0.2)):
        h.add(step, step / 2, {"nme_diag": v, "confusion": [[1]]})
    assert h.best()["step"] == 4 and h.last()["step"] == 8 and "confusion" not in h.last()
    assert h.curve() == [(2, 0.3), (4, 0.1), (6, 0.1), (8, 0.2)]
    p = EvalHistory("parsing", [{"step": 1, "epoch": 1.0, "f1_mean": None}])
    assert p.best() is None
    p.add(2, 2.0, {"f1_mean": 0.5})
    p.add(3, 3.0, {"f1_mean": float("nan")})
    p.add(2, 2.0, {"f1_mean": 0.6})
    assert p.best() == {"step": 2, "epoch": 2.0, "f1_mean": 0.6} and [r["step"] for r in p.records] == [1, 2, 3]
    assert p.last()["f1_mean"] is None
    assert [due(s, 2, 6) for s in range(1, 7)] == [False, True, False, True, False, False]
    assert not any(due(s, 0, 6) for s in range(1, 7))


def test_every_evaluation_is_logged_and_best_and_last_reported(sets, tmp_path):
    """--eval-every 1: an eval row per step; metrics.json's best is the lowest of them, its last the final step;
    scoring mid-run leaves the trained weights exactly as a run that scores only at the end."""
    assert _run(sets, tmp_path / "a", "--max-steps", "4", "--eval-every", "1") == 0
    assert _run(sets, tmp_path / "b", "--max-steps", "4", "--eval-every", "end") == 0
    rows = _rows(tmp_path / "a" / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4] and [r["epoch"] for r in evals] == [0.5, 1.0, 1.5, 2.0]
    m = json.load(open(tmp_path / "a" / "metrics.json"))
    best = min(evals, key=lambda r: (r["nme_diag"], r["step"]))
    assert m["best"]["step"] == best["step"] and m["best"]["nme_diag"] == best["nme_diag"]
    assert m["last"]["step"] == 4 and m["nme_diag"] == evals[-1]["nme_diag"]
    assert m["evaluations"] == [[r["step"], r["nme_diag"]] for r in evals]
    final = rows[-1]
    assert final["kind"] == "final" and final["best"]["step"] == best["step"] and final["last"]["step"] == 4
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.load(open(tmp_path / "b" / "metrics.json"))["nme_diag"] == m["nme_diag"]
    md = open(tmp_path / "a" / "metrics.md").read()
    assert "last (step 4)" in md and f"best (step {best['step']})" in md and "best-of-test-epochs" in md


def test_resume_repeats_the_uninterrupted_rows_and_best(sets, tmp_path):
    """Stopped after 2 of 4 steps (a row of step 3 and a cut line left behind as by a kill), the resumed run's
    metrics.jsonl and best/last equal the uninterrupted run's."""
    args = ("--max-steps", "4", "--ckpt-every", "1", "--eval-every", "1")
    assert _run(sets, tmp_path / "a", *args) == 0
    assert _run(sets, tmp_path / "b", *args, "--stop-after", "2") == 0
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 9.0}) + "\n" + '{"kind": "eval", "st')
    assert _run(sets, tmp_path / "b", *args) == 0

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip(_rows(tmp_path / "a" / "metrics.jsonl")) == strip(_rows(tmp_path / "b" / "metrics.jsonl"))
    ma, mb = (json.load(open(tmp_path / d / "metrics.json")) for d in "ab")
    assert ma["best"] == mb["best"] and ma["evaluations"] == mb["evaluations"]
    # a rerun of the finished run scores the last step again, without duplicating rows
    n = len(_rows(tmp_path / "b" / "metrics.jsonl"))
    assert _run(sets, tmp_path / "b", *args) == 0
    assert len(_rows(tmp_path / "b" / "metrics.jsonl")) == n
    assert "resuming" in open(tmp_path / "b" / "eval.log").read()


def test_truncation_keeps_what_the_checkpoint_holds(tmp_path):
    """Rows up to the checkpoint stay (its mid-run evaluation too); the last step's evaluation and the final row
    are written again after resuming from the last step's checkpoint."""
    assert keep_row({"kind": "eval", "step": 2}, 2, 4) and not keep_row({"kind": "eval", "step": 4}, 4, 4)
    assert keep_row({"step": 4}, 4, 4) and not keep_row({"kind": "final", "step": 4}, 4, 4)
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ({"kind": "train", "step": 1}, {"kind": "eval", "step": 1},
                                                        {"kind": "train", "step": 2})))
    truncate_rows(str(p), 1, 4)
    assert [json.loads(s)["kind"] for s in p.read_text().splitlines()] == ["train", "eval"]
    truncate_rows(str(p), 0, 4)  # a fresh start empties it
    assert p.read_text() == ""
