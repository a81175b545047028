"""Teacher kinds are registry entries: a new kind is one class plus one registry line, and the config,
the pre-flight checks, --help, MCFModel and the training loop all follow it."""
import dataclasses
import json
import os

import pytest
import torch
from test_pretrain_e2e import TINY

from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.teacher import TEACHERS
from mcf_fast.train import cli
from mcf_fast.train.config import ModelConfig, from_preset


class MeanColourTeacher:
    """A toy kind: the decoder's image is judged by its mean colour alone (no network)."""
    name, takes_path, term = "mean_colour", False, "mean_colour"
    summary = "the toy kind of this test: squared error of the images' mean colours"
    fields = ("model.perceptual_weight",)
    prechecked: list = []

    @classmethod
    def precheck(cls, cfg) -> None:
        cls.prechecked.append(cfg.model.teacher)
        if cfg.model.perceptual_weight > 1e6:
            raise ValueError("--model.perceptual_weight: too large for the mean_colour teacher")

    @staticmethod
    def build(spec, model):
        return None

    @staticmethod
    def loss(model, imgs, pred, pred_patches, mask):
        return ((pred.float().mean((2, 3)) - imgs.float().mean((2, 3))) ** 2).mean()


@pytest.fixture
def toy():
    MeanColourTeacher.prechecked = []
    with TEACHERS.registered(MeanColourTeacher):
        yield MeanColourTeacher


def test_builtin_kinds_declare_what_they_read():
    """Each built-in kind owns its name, summary, loss-term name and config fields (all real fields)."""
    real = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    assert TEACHERS.names() == ("checkpoint", "random", "ema", "pixel")
    for kind in TEACHERS:
        assert kind.summary and kind.term in ("perceptual", "pixel")
        assert set(kind.fields) <= real, set(kind.fields) - real
        assert callable(kind.precheck) and callable(kind.build) and callable(kind.loss)


def test_toy_kind_in_help_and_config_checks(toy, capsys):
    """A registered kind is listed by --help with its summary, accepted by validation, and its precheck runs;
    an unknown kind's error lists it among the choices."""
    text = " ".join(cli.build_parser().format_help().split())
    assert "'mean_colour' (the toy kind of this test" in text
    cfg, _ = cli.parse_args(["--model.teacher", "mean_colour", "--out", "/nonexistent/never"])
    assert cfg.model.teacher == "mean_colour" and toy.prechecked == ["mean_colour"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--model.teacher", "mean_colour", "--model.perceptual_weight", "1e7"])
    assert "too large for the mean_colour teacher" in capsys.readouterr().err
    m = from_preset("demo").model
    m.teacher = "mean_colur"
    with pytest.raises(ValueError, match="did you mean 'mean_colour'.*mean_colour"):
        m.validate()


def test_toy_kind_without_registration_is_unknown():
    """Outside the registration the name is refused: the registry, not a list, decides."""
    m = from_preset("demo").model
    m.teacher = "mean_colour"
    with pytest.raises(ValueError, match="unknown teacher"):
        m.validate()


def test_toy_kind_builds_and_its_loss_trains(toy):
    """MCFModel.from_config builds the toy kind, the forward uses its loss, and gradients reach the decoder."""
    m = from_preset("demo").model
    m.teacher, m.depth, m.decoder_depth = "mean_colour", 1, 1
    model = MCFModel.from_config(m, seed=0)
    assert model.teacher_entry is toy and model.perceptual is None
    N, L = 4, model.encoder.num_patches
    keep = torch.stack([torch.randperm(L)[: L // 4].sort().values for _ in range(N)])
    restore = torch.stack([torch.argsort(torch.cat([k, torch.tensor(sorted(set(range(L)) - set(k.tolist())))]))
                           for k in keep])
    mask = torch.ones(N, L, dtype=torch.bool).scatter_(1, keep, False)
    imgs = torch.randn(N, 3, m.img_size, m.img_size)
    out = model(imgs, keep, restore, mask, keep)
    want = toy.loss(model, imgs, out.pred, None, mask)
    torch.testing.assert_close(out.terms["mean_colour"], want.detach())  # the kind names its term
    out.loss.backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0


def test_toy_kind_trains_through_the_loop(toy, tmp_path):
    """A run with the toy kind trains end to end (metrics rows, checkpoint, export) like a built-in one."""
    from mcf_fast.train.loop import train
    out = tmp_path / "run"
    cfg, _ = cli.parse_args(["--out", str(out), "--max-steps", "2", *TINY, "--model.teacher", "mean_colour",
                             "--run.log_every", "1", "--run.tensorboard", "false", "--run.progress", "none"])
    train(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss_mean_colour"] > 0 for r in rows)  # logged under its own name
    assert json.load(open(out / "config.json"))["model"]["teacher"] == "mean_colour"
    assert os.path.exists(out / "encoder.safetensors")
