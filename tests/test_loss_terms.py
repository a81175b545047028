"""Loss terms travel by name: the model's mapping of terms and weights, the step's sums, the metrics
window's averages, the metrics row and the console line all iterate over names."""
import re

import pytest
import torch

from mcf_fast.data.loader import Batch
from mcf_fast.model import terms as terms_mod
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.terms import LossTerm
from mcf_fast.train.logger import loss_text
from mcf_fast.train.optim import build_optimizer
from mcf_fast.train.runtime import Runtime
from mcf_fast.train.step import TrainStep
from mcf_fast.train.window import MetricsWindow

CPU = torch.device("cpu")
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, proj_hidden=64, proj_dim=16,
            teacher_arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2), teacher_layers=(0,))


def _inputs(n=4, seed=0):
    from mcf_fast.masking import random_masks
    g = torch.Generator().manual_seed(seed)
    m = random_masks(n, 16, 0.75, views=2, seed=seed, step=0, sample_ids=torch.arange(n))
    return torch.randn(n, 3, 32, 32, generator=g), m.ids_keep[0], m.ids_restore[0], m.mask[0], m.ids_keep[1]


def _step(model, accum=1):
    from mcf_fast.train.config import from_preset
    cfg = from_preset("demo")
    cfg.model.img_size, cfg.model.patch_size = 32, 8  # the masks' grid: the model's
    cfg.optim.accum_steps = accum
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    return TrainStep(model, opt, cfg, Runtime(CPU, "fp32", 0, 1, 0))


def _batches(n=4, count=8):
    g = torch.Generator().manual_seed(3)
    return iter([Batch(torch.randn(n, 3, 32, 32, generator=g), torch.arange(i * n, (i + 1) * n)) for i in range(count)])


def test_model_returns_named_terms_whose_weighted_sum_is_the_loss():
    """A teacher run names its terms perceptual and contrastive, with the configured weights; the loss
    is exactly w_p * perceptual + w_c * contrastive."""
    model = MCFModel(**TINY, teacher="random", perceptual_weight=1000.0, contrastive_weight=0.5)
    out = model(*_inputs())
    assert list(out.terms) == ["perceptual", "contrastive"] and out.weights == {"perceptual": 1000.0,
                                                                               "contrastive": 0.5}
    assert torch.equal(out.loss.detach(), 1000.0 * out.terms["perceptual"] + 0.5 * out.terms["contrastive"])
    assert out.loss_perceptual is out.terms["perceptual"] and out.loss_contrastive is out.terms["contrastive"]
    assert all(not t.requires_grad for t in out.terms.values()) and out.loss.requires_grad


def test_pixel_teacher_term_is_named_pixel():
    """Without a teacher the decoder's term is MAE's pixel loss, named 'pixel' (and still read by the old
    attribute loss_perceptual)."""
    model = MCFModel(**TINY, teacher="pixel")
    out = model(*_inputs())
    assert list(out.terms) == ["pixel", "contrastive"]
    assert out.loss_perceptual is out.terms["pixel"]


def test_a_zero_weight_term_is_neither_computed_nor_reported(monkeypatch):
    """contrastive_weight 0 (the demo's MAE teacher stage): no InfoNCE, no target-encoder pass, no gradient
    into the heads, and the term is absent from the output; perceptual_weight 0: the teacher never runs."""
    def boom(*a, **kw):
        raise AssertionError("a weight-0 term was computed")
    model = MCFModel(**TINY, teacher="pixel", contrastive_weight=0.0)
    monkeypatch.setattr(terms_mod.ops, "info_nce", boom)
    monkeypatch.setattr(model.target_encoder, "forward_visible", boom)
    out = model(*_inputs())
    out.loss.backward()
    assert list(out.terms) == ["pixel"] and out.loss_contrastive is None
    assert all(p.grad is None for p in list(model.projector.parameters()) + list(model.predictor.parameters()))
    monkeypatch.undo()
    model = MCFModel(**TINY, teacher="random", perceptual_weight=0.0)
    monkeypatch.setattr(model.perceptual, "forward", boom)
    assert list(model(*_inputs()).terms) == ["contrastive"]


def test_all_weights_zero_is_refused():
    """A model whose every term has weight 0 would train nothing: refused by name, by the config check
    (before a run folder is touched) and by the model."""
    from mcf_fast.train.config import from_preset
    cfg = from_preset("demo")
    cfg.model.perceptual_weight = cfg.model.contrastive_weight = 0.0
    with pytest.raises(ValueError, match="--model.contrastive_weight 0.0: is 0 and so is --model.perceptual_weight"):
        cfg.validate()
    with pytest.raises(ValueError, match="perceptual_weight and --model.contrastive_weight are both 0"):
        MCFModel(**TINY, teacher="random", perceptual_weight=0.0, contrastive_weight=0.0)


def test_a_new_term_is_one_entry_and_reaches_step_window_row_and_console():
    """One assignment to model.loss_terms adds a term: the step sums it, the window averages it, the row
    logs it as loss_<name> with its weight, the console line shows it, and the total includes it."""
    model = MCFModel(**TINY, teacher="random").train()
    model.loss_terms["toy"] = LossTerm(0.5, lambda m, s: s.pred.float().pow(2).mean())  # the one place
    step = _step(model, accum=2)
    window = MetricsWindow(CPU, None, {n: t.weight for n, t in model.loss_terms.items()})
    batches = _batches()
    results = [step(batches, i, 1e-3, 0.99) for i in range(2)]
    for r in results:
        assert list(r.terms) == ["perceptual", "contrastive", "toy"] and r.weights["toy"] == 0.5
        torch.testing.assert_close(r.loss, sum(r.weights[n] * v for n, v in r.terms.items()), rtol=1e-6, atol=1e-6)
        window.add(r)
    row = window.row(2, 2, Runtime(CPU, "fp32", 0, 1, 0), epoch=0.0, lr=1e-3, momentum=0.99, eff_batch=8,
                     data_s=0.0, data_stats={})
    mean = lambda k: float(sum(r.terms[k] for r in results)) / 2  # noqa: E731
    assert row["loss_toy"] == pytest.approx(mean("toy"), rel=1e-6)
    assert row["loss_perceptual"] == pytest.approx(mean("perceptual"), rel=1e-6)
    assert row["term_weights"] == {"perceptual": 1000.0, "contrastive": 1.0, "toy": 0.5}
    assert row["loss"] == pytest.approx(sum(w * row[f"loss_{n}"] for n, w in row["term_weights"].items()), rel=1e-5)
    assert "toy " in loss_text(row)


def test_window_learns_a_term_it_was_not_told_about():
    """A MetricsWindow built without the term list (the step benchmark's) starts summing a term when the
    first step brings it."""
    model = MCFModel(**TINY, teacher="pixel", perceptual_weight=1.0, contrastive_weight=0.0).train()
    window = MetricsWindow(CPU)
    r = _step(model)(_batches(), 0, 1e-3, 0.99)
    window.add(r)
    row = window.row(1, 1, Runtime(CPU, "fp32", 0, 1, 0), epoch=0.0, lr=0.0, momentum=0.0, eff_batch=4, data_s=0.0,
                     data_stats={})
    assert row["loss_pixel"] == pytest.approx(float(r.terms["pixel"])) and "loss_contrastive" not in row
    assert row["term_weights"] == {"pixel": 1.0}


def test_window_state_resumes_by_name():
    """A window saved mid-way continues its named sums; a window saved before terms had names (the pixel
    term summed as loss_perceptual) continues as loss_pixel."""
    rt = Runtime(CPU, "fp32", 0, 1, 0)
    kw = dict(epoch=0.0, lr=0.0, momentum=0.0, eff_batch=4, data_s=0.0, data_stats={})
    state = {"window": {"loss": torch.tensor(6.0), "loss_perceptual": torch.tensor(4.0),
                        "loss_contrastive": torch.tensor(2.0), "grad_norm": torch.tensor(1.0),
                        "steps": torch.tensor(2.0)}, "consec_bad": torch.tensor(0.0),
             "skipped_total": torch.tensor(0.0)}
    row = MetricsWindow(CPU, state, {"perceptual": 1.0, "contrastive": 1.0}).row(2, 2, rt, **kw)
    assert (row["loss"], row["loss_perceptual"], row["loss_contrastive"]) == (3.0, 2.0, 1.0)
    old = MetricsWindow(CPU, state, {"pixel": 1.0})
    row = old.row(2, 2, rt, **kw)
    assert row["loss_pixel"] == 2.0 and "loss_perceptual" not in row and "loss_contrastive" not in row
    assert set(old.state()["window"]) == {"loss", "loss_pixel", "grad_norm", "steps"}


def test_console_line_adds_up():
    """The console shows each term's weighted contribution with its weight and value; the contributions
    add up to the loss as printed; a window with no finite step says n/a."""
    row = {"loss": 94.32902, "loss_perceptual": 0.0935142, "loss_contrastive": 0.81482,
           "term_weights": {"perceptual": 1000.0, "contrastive": 1.0}}
    text = loss_text(row)
    assert text == "loss 94.3290 = perceptual 93.5142 (1000 x 0.09351) + contrastive 0.8148 (1 x 0.8148)"
    total, *parts = (float(x) for x in re.findall(r"(?:loss|perceptual|contrastive) (\d+\.\d+)", text))
    assert sum(parts) == pytest.approx(total, abs=1e-4)
    assert loss_text({"loss": None, "loss_perceptual": None, "term_weights": {"perceptual": 1.0}}) == "loss n/a"
