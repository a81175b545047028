"""The traced step: its bytes against a measured step, its FLOPs against the step suite's count, its parts."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mcf_fast.plan.hardware import mae_b_flops_per_image
from mcf_fast.plan.trace import PARTS, trace_step
from mcf_fast.plan.tracer import StepTracer
from mcf_fast.train.config import from_preset

MiB = 1 << 20


def _cfg(preset, batch, accum=1, **model):
    cfg = from_preset(preset)
    cfg.model.teacher = "random"
    cfg.optim.batch_size, cfg.optim.accum_steps = batch, accum
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture(scope="module")
def demo_fp32():
    return trace_step(_cfg("demo", 8), "fp32")


@pytest.fixture(scope="module")
def demo_bf16():
    return trace_step(_cfg("demo", 8), "bf16")


# ----------------------------------------------------------------------------- the tracer's bookkeeping
def test_tracer_counts_each_storage_once_while_it_lives():
    """Views share their storage's bytes; a storage counts until its last view dies; pre-existing
    tensors and in-place updates of them count nothing; weight casts and gradients get their category."""
    held = []
    with FakeTensorMode():
        w = torch.nn.Parameter(torch.empty(250))  # 1000 bytes, persistent
        tracer = StepTracer([w], [w], {})
        with tracer:
            held.append(torch.empty(100))  # 400 bytes, then a gradient
            tracer.mark_grad(held[-1])
            a = torch.empty(1000)  # 4000
            held.append(torch.empty(500))  # 2000
            v = a[:10]
            del a
            held.append(torch.empty(250))  # 1000: act 7000, a's storage held by v
            assert tracer.live["act"] == 7000
            del v
            assert tracer.live["act"] == 3000
            held.append(torch.empty(1500))  # 6000: act 9000
            with torch.no_grad():
                w.add_(1.0)
            held.append(w.to(torch.bfloat16))  # 500 bytes of weight cast
    assert tracer.peak == {"all": 9000 + 500 + 400, "act+cast": 9000 + 500, "act": 9000}
    assert tracer.at_peak["all"]["grad"] == 400 and tracer.at_peak["all"]["cast"] == 500


def test_backward_flops_go_to_the_part_that_made_the_graph():
    """A part's backward operators count for that part (labels on the autograd nodes it created)."""
    registry = FlopCounterMode(display=False).flop_registry
    with FakeTensorMode():
        w1 = torch.nn.Parameter(torch.empty(32, 16))
        w2 = torch.nn.Parameter(torch.empty(4, 32))
        x = torch.empty(8, 16)
        tracer = StepTracer([w1, w2], [w1, w2], registry)
        with tracer:
            h = tracer.run_part("a", lambda t: t @ w1.t(), x)
            y = tracer.run_part("b", lambda t: t @ w2.t(), h)
            y.sum().backward()
    # a: forward 2*8*16*32, backward grad_w1 only (x needs no gradient); b: forward, grad_h, grad_w2
    assert dict(tracer.flops) == {"a": 2 * 8192, "b": 3 * 2048}


# ----------------------------------------------------------------------------- memory: traced vs measured
def _within(measured, traced, tol=0.15):
    return abs(measured / traced - 1) <= tol


def _traced_and_measured(fresh_child, check):
    """The fresh interpreter's (traced, measured) bytes of one fp32 CPU step (tests/fresh_child.py)."""
    assert fresh_child["rc"] == 0, fresh_child["stderr"]
    res = fresh_child[check]
    assert "failed" not in res, res
    if "skip" in res:
        pytest.skip(res["skip"])
    return res["traced"], res["measured"]


@pytest.mark.fresh("plan_demo")
def test_traced_peak_matches_the_measured_demo_step(fresh_child):
    """The traced transient bytes of a demo step are within 15% of the measured step peak (CPU, fp32;
    both in a fresh interpreter, where no other test's heap or threads move the resident set)."""
    traced, measured = _traced_and_measured(fresh_child, "plan_demo")
    assert _within(measured, traced), (measured / MiB, traced / MiB)


@pytest.mark.slow
@pytest.mark.fresh("plan_vit_s")
def test_traced_peak_matches_the_measured_vit_s_batch_8_step(fresh_child):
    """vit-s at batch 8 (fp32, CPU): the traced peak is within 15% of the measured one (both ~855 MiB)."""
    traced, measured = _traced_and_measured(fresh_child, "plan_vit_s")
    assert _within(measured, traced), (measured / MiB, traced / MiB)


def test_accumulation_keeps_every_gradient_live(demo_fp32):
    """With accumulation the earlier micro-batches' fp32 gradients are live through the traced one."""
    tr = trace_step(_cfg("demo", 8, accum=4), "fp32")
    assert tr.accumulating and tr.at_peak["all"]["grad"] == tr.bytes_of("trainable")
    assert tr.peak["all"] >= demo_fp32.peak["act"] + tr.bytes_of("trainable")


def test_masks_are_drawn_for_real_by_either_backend(demo_fp32, monkeypatch):
    """With the torch mask ops (where mcf_fast._C is not built, e.g. a fresh GPU machine before its build)
    the step still traces: the generator reads the sample ids' values outside the fake mode. Same FLOPs,
    same peak but for the torch ops' own temporaries."""
    import mcf_fast.masking as masking
    monkeypatch.setattr(masking, "_DEFAULT", "torch")
    tr = trace_step(_cfg("demo", 8), "fp32")
    assert tr.flops == demo_fp32.flops and abs(tr.peak["all"] / demo_fp32.peak["all"] - 1) < 0.01


def test_bf16_trace_sees_weight_casts_and_fp32_none(demo_fp32, demo_bf16):
    """autocast's weight copies are a category of their own (FSDP2 bf16 runs do without them)."""
    bf = demo_bf16
    assert bf.peak["act+cast"] > bf.peak["act"] and demo_fp32.peak["act+cast"] == demo_fp32.peak["act"]


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flops_equal_the_step_suite_count(precision, request):
    """The plan's FLOPs per step are exactly the step benchmark's FlopCounterMode count (demo, batch 8: the
    module's traces)."""
    from benchmarks.step_child import flops_of
    from mcf_fast.model.mcf import MCFModel
    cfg = _cfg("demo", 8)
    tr = request.getfixturevalue(f"demo_{precision}")
    model = MCFModel.from_config(cfg.model, seed=0).train()
    suite = flops_of(model, cfg, torch.device("cpu"), precision, 8, "engine")["total"]
    assert tr.flops == suite


def test_flops_by_part_cover_the_step(demo_fp32):
    """Every part is labelled, the parts add up to the total, and the teacher's pass on the
    reconstruction (forward + input gradient) costs between 2 and 3 of its no-grad pass."""
    p = demo_fp32.flops_by_part
    assert set(p) == set(PARTS) and sum(p.values()) == demo_fp32.flops and not demo_fp32.missing_parts
    assert min(p[k] for k in PARTS if k != "other") > 0
    orig = p["teacher on the original"]
    assert 2 * orig < p["teacher on the reconstruction"] < 3 * orig


def test_teacher_checkpointing_costs_the_recomputed_blocks(demo_fp32):
    """--model.teacher_grad_ckpt adds what torch's checkpoint recomputes in the teacher's blocks: qkv, proj,
    fc1 and attention, not fc2 (its output feeds no saved tensor: the recompute stops early), and it
    lowers the activation peak."""
    cfg = _cfg("demo", 8, teacher_grad_ckpt=True)
    tr = trace_step(cfg, "fp32")
    m, N = cfg.model, 8
    T, D = (m.teacher_img_size // m.teacher_patch_size) ** 2 + 1, m.teacher_embed_dim
    recompute = m.teacher_depth * (2 * N * T * D * D * (3 + 1 + 4) + 4 * N * T * T * D)
    extra = tr.flops_by_part["teacher on the reconstruction"] - demo_fp32.flops_by_part["teacher on the reconstruction"]
    assert extra == recompute
    assert tr.peak["act"] < demo_fp32.peak["act"]


def test_mae_b_anchor_counts_as_the_step_does():
    """The MAE-B FLOPs behind the DailyMAE anchor equal vit-b-paper's counted encoder + decoder (1%)."""
    tr = trace_step(_cfg("vit-b-paper", 2), "fp32")
    counted = (tr.flops_by_part["encoder"] + tr.flops_by_part["decoder"]) / 2
    assert abs(mae_b_flops_per_image() / counted - 1) < 0.01
