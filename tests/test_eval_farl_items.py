"""`--protocol farl` computes every score FaRL's way: each item against a restatement of FaRL's own function
(FacePerceiver/FaRL, its blueprint framework, mmcv) on fixed inputs, and ours stays selectable."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mcf_fast.eval import farl
from mcf_fast.eval.config import FARL_CHOICES, EvalConfig
from mcf_fast.eval.metrics import alignment_metrics, auc_fr, f1_from_confusion, parsing_metrics
from mcf_fast.eval.train import Ema, autocast_for
from mcf_fast.eval.uper import ConvBNReLU, FarlHead, mmcv_kaiming_


# ---------------------------------------------------------------- restatements of FaRL's code
def farl_simps(y, x):
    """scipy < 1.11 `simps(y, x)` (even='avg'), as FaRL's scorer calls it: the non-uniform Simpson sum over
    sample triples; with an even sample count the mean of 'first' (Simpson then one trapezoid) and 'last'."""
    y, x = np.asarray(y, float), np.asarray(x, float)

    def basic(lo, hi):  # Simpson over samples lo..hi, hi - lo even
        total = 0.0
        for i in range(lo, hi, 2):
            h0, h1 = x[i + 1] - x[i], x[i + 2] - x[i + 1]
            total += (h0 + h1) / 6.0 * (y[i] * (2 - h1 / h0) + y[i + 1] * (h0 + h1) ** 2 / (h0 * h1)
                                        + y[i + 2] * (2 - h0 / h1))
        return total
    n = len(y)
    if n % 2:
        return basic(0, n - 1)
    first = basic(0, n - 2) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    last = 0.5 * (x[1] - x[0]) * (y[1] + y[0]) + basic(1, n - 1)
    return 0.5 * (first + last)


def farl_auc_fr(nmes, threshold=0.07, step=1e-4):
    """face_alignment/scorer.py AUC_FR.finalize_evaluation, restated."""
    nmes = np.sort(np.asarray(nmes, float))
    xaxis = list(np.arange(0.0, threshold + step, step))
    ced = [float(np.count_nonzero(nmes <= x)) / len(nmes) for x in xaxis]
    return farl_simps(ced, xaxis) / threshold, 1.0 - ced[-1]


def farl_nmes(gt, pred, boxes_tlbr):
    """face_alignment/scorer.py NME with scorers/aflw19.yaml's four unit distances, restated (box = y1 x1 y2 x2)."""
    units = {"inter_ocular": lambda lm, b: np.linalg.norm(lm[6] - lm[11]),
             "inter_pupil": lambda lm, b: np.linalg.norm(lm[7] - lm[10]),
             "box": lambda lm, b: math.sqrt((b[2] - b[0]) * (b[3] - b[1])),
             "diag": lambda lm, b: math.hypot(b[2] - b[0], b[3] - b[1])}
    sums = dict.fromkeys(units, 0.0)
    for lm, p, b in zip(gt, pred, boxes_tlbr):
        for name, unit in units.items():
            sums[name] += (np.linalg.norm(lm - p, axis=-1) / unit(lm, b)).mean()
    return {k: v / len(gt) for k, v in sums.items()}


def farl_f1(hist, names, bg="background"):
    """face_parsing/scorer.py F1Score.finalize_evaluation, restated (compute_fg_mean)."""
    hist = np.asarray(hist, np.int64)
    a, b, inter = hist.sum(0).astype(float), hist.sum(1).astype(float), np.diag(hist).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * inter / (a + b)
    out = {names[i]: f1[i] for i in range(len(names))}
    fg = [f1[i] for i in range(len(names)) if names[i] != bg]
    out["fg_mean"] = sum(fg) / len(fg)
    return out


def blueprint_accumulate(ema_net, net, decay):
    """blueprint ml/util.py accumulate(model1, model2, decay), restated: parameters and float buffers
    averaged, other buffers copied."""
    with torch.no_grad():
        for (_, pe), (_, p) in zip(ema_net.named_parameters(), net.named_parameters()):
            pe.mul_(decay).add_(p, alpha=1 - decay)
        for (_, be), (_, b) in zip(ema_net.named_buffers(), net.named_buffers()):
            if be.is_floating_point():
                be.mul_(decay).add_(b, alpha=1 - decay)
            else:
                be.copy_(b)


def _blueprint_tanh(u, wf, fn):
    """blueprint's piecewise warp of coordinates normalised as x / w * 2 - 1: linear inside, fn beyond 1 - wf."""
    out = u.copy()
    hi, lo = u > 1.0 - wf, u < -1.0 + wf
    out[hi] = fn((u[hi] - 1.0 + wf) / wf) * wf + 1.0 - wf
    out[lo] = fn((u[lo] + 1.0 - wf) / wf) * wf - 1.0 + wf
    return out


def blueprint_to_warped(pts, m512, wf, w=512):
    """blueprint geometry `_inverted_tanh_warp_transform`: original pixel centres -> warped pixel centres."""
    q = np.asarray(pts, float) @ m512[:2, :2].T + m512[:2, 2]
    if wf > 0:
        q = (_blueprint_tanh(q / w * 2 - 1, wf, np.tanh) + 1) / 2 * w
    return q


def blueprint_to_original(q, m512, wf, w=512):
    """blueprint geometry `_tanh_warp_transform`: warped pixel centres -> original pixel centres."""
    q = np.array(q, float)
    if wf > 0:
        q = (_blueprint_tanh(q / w * 2 - 1, wf, lambda v: np.arctanh(np.clip(v, -0.999, 0.999))) + 1) / 2 * w
    inv = np.linalg.inv(m512)
    return q @ inv[:2, :2].T + inv[:2, 2]


# ---------------------------------------------------------------- the items
NMES = np.concatenate([np.random.default_rng(3).gamma(2.0, 0.012, 300), [0.07, 0.07005, 0.0701, 0.0702, 0.0]])


def test_auc_fr_grid_is_farls():
    """AUC/FR: FaRL's grid (np.arange to 0.0701, simps even='avg', failures above 0.0701) on fixed NMEs;
    the closed grid (ours) differs, and an NME of 0.07005 fails only there."""
    auc, fr = auc_fr(NMES, grid="farl")
    ref_auc, ref_fr = farl_auc_fr(NMES)
    assert auc == pytest.approx(ref_auc, abs=1e-12) and fr == pytest.approx(ref_fr, abs=1e-15)
    closed = auc_fr(NMES, grid="closed")
    assert abs(closed[0] - auc) > 1e-5 and closed[1] > fr
    assert auc_fr([0.07005], grid="farl")[1] == 0.0 and auc_fr([0.07005], grid="closed")[1] == 1.0
    assert EvalConfig(task="alignment").resolved().auc_grid == "farl"


def test_nmes_and_inter_pupil_are_farls():
    """NME_diag / box / inter-ocular and the added inter-pupil equal FaRL's NME scorer on fixed landmarks."""
    rng = np.random.default_rng(7)
    gt = rng.uniform(20, 80, (12, 19, 2))
    pred = gt + rng.normal(0, 2.0, gt.shape)
    lrtb = np.stack([gt[..., 0].min(1) - 3, gt[..., 0].max(1) + 3, gt[..., 1].min(1) - 4, gt[..., 1].max(1) + 2], 1)
    ours = alignment_metrics(pred, gt, lrtb)
    ref = farl_nmes(gt, pred, lrtb[:, [2, 0, 3, 1]])
    for k in ("inter_ocular", "inter_pupil", "box", "diag"):
        assert ours[f"nme_{k}"] == pytest.approx(ref[k], rel=1e-12), k


def test_absent_class_is_nan_as_farl():
    """F1 per class and the foreground mean equal FaRL's F1Score; an absent class makes the mean NaN (FaRL),
    or is skipped (ours, selectable)."""
    names = ("background", "skin", "nose", "hair")
    rng = np.random.default_rng(2)
    full = rng.integers(0, 50, (4, 4))
    absent = full.copy()
    absent[2, :] = absent[:, 2] = 0  # nose neither labelled nor predicted
    for hist in (full, absent):
        ref = farl_f1(hist, names)
        ours = parsing_metrics(torch.from_numpy(hist), class_names=names)
        np.testing.assert_allclose(f1_from_confusion(hist), [ref[n] for n in names], rtol=1e-12)
        assert (math.isnan(ours["f1_mean"]) and math.isnan(ref["fg_mean"])) or \
            ours["f1_mean"] == pytest.approx(ref["fg_mean"], rel=1e-12)
    assert math.isnan(parsing_metrics(torch.from_numpy(absent), class_names=names)["f1_mean"])
    skip = parsing_metrics(torch.from_numpy(absent), class_names=names, absent="skip")
    assert skip["f1_mean"] == pytest.approx(np.mean([farl_f1(absent, names)[n] for n in ("skin", "hair")]))


def test_ema_has_no_warmup_and_averages_bn_buffers_as_farl():
    """FaRL's EMA (decay 0.999 from the first step, BN running stats averaged, the step counter copied)
    equals ours with warm-up off, bit for bit; ours with warm-up differs from the first update."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    ref, ours, warm = copy.deepcopy(net), Ema(net, 0.999), Ema(net, 0.999, warmup=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(4):
        loss = net(torch.randn(5, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        blueprint_accumulate(ref, net, 0.999)
        ours.update(net, step)
        warm.update(net, step)
    sd = ref.state_dict()
    assert all(torch.equal(ours.state[k], sd[k]) for k in sd)
    assert not torch.equal(warm.state["1.running_mean"], sd["1.running_mean"])
    assert int(ours.state["1.num_batches_tracked"]) == 4
    assert EvalConfig(task="parsing").resolved().ema_warmup is False


@pytest.mark.parametrize("wf", [0.0, 0.8])
def test_tanh_frame_is_blueprints(wf):
    """Points, the image map and the inverse map follow blueprint's x / 512 pixel-centre frame (our input
    S = 448 is the 512 warp scaled); the centre frame (ours) moves points by up to ~0.7 px of 512."""
    rng = np.random.default_rng(5)
    a, s = 0.3, 2.2
    m = np.array([[s * math.cos(a), -s * math.sin(a), 60.0], [s * math.sin(a), s * math.cos(a), -20.0], [0, 0, 1]])
    size = 448
    to512 = np.array([[512 / size, 0, -0.5], [0, 512 / size, -0.5], [0, 0, 1.0]])  # continuous S -> 512 centres
    m512 = to512 @ m
    shift = farl.frame_shift("blueprint", size)
    pts = rng.uniform(-20, 220, (400, 2))
    ours = farl.to_input(pts, m, size, wf, shift)
    np.testing.assert_allclose((blueprint_to_warped(pts, m512, wf) + 0.5) * size / 512, ours, atol=1e-9)
    np.testing.assert_allclose(farl.from_input(ours, m, size, wf, shift),
                               blueprint_to_original(ours * 512 / size - 0.5, m512, wf), atol=1e-7)
    m_full = np.array([[512 / size, 0, 0], [0, 512 / size, 0], [0, 0, 1.0]]) @ m  # the same face at S = 512
    ys, xs = np.mgrid[0:512, 0:512].astype(float)
    grid = farl.input_grid(m_full, 512, wf, farl.frame_shift("blueprint", 512)) - 0.5  # dataset pixel centres
    centre = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1.0]])  # continuous 512 -> pixel centres
    ref = blueprint_to_original(np.stack([xs, ys], -1).reshape(-1, 2), centre @ m_full, wf)  # GetTransformMap
    np.testing.assert_allclose(grid.reshape(-1, 2), ref, atol=1e-6)
    moved = np.abs(farl.to_input(pts, m, size, wf, 0.0) - ours).max() * 512 / size
    assert (moved > 0.1) == (wf > 0)
    assert EvalConfig(task="parsing").resolved().warp_frame == "blueprint"


def test_head_init_is_mmcv_kaiming_fan_out():
    """Every conv+BN+ReLU block of FaRL's UPerHead starts as mmcv's ConvModule does (Kaiming-normal, fan_out,
    ReLU gain, right after the conv is built); the classifier and the FPN resamplers keep PyTorch's init."""
    torch.manual_seed(11)
    block = ConvBNReLU(48, 64, 3, "mmcv")
    torch.manual_seed(11)
    conv = nn.Conv2d(48, 64, 3, padding=1, bias=False)  # built first, as mmcv's ConvModule builds it
    ref = torch.empty_like(conv.weight).normal_(0.0, math.sqrt(2.0 / (64 * 3 * 3)))  # kaiming_init, restated
    torch.testing.assert_close(block[0].weight, ref, rtol=1e-6, atol=0)
    assert torch.equal(block[1].weight, torch.ones(64)) and torch.equal(block[1].bias, torch.zeros(64))
    head = FarlHead(64, 16, 11, 256, init="mmcv")
    for mod in head.uper.modules():
        if isinstance(mod, ConvBNReLU):
            w = mod[0].weight.detach()
            fan_out = w.shape[0] * w.shape[2] * w.shape[3]
            assert float(w.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    bound = 1 / math.sqrt(head.uper.cls.in_channels)  # PyTorch's Conv2d default: U(+-1/sqrt(fan_in))
    assert float(head.uper.cls.weight.detach().abs().max()) <= bound
    torch.manual_seed(11)
    plain = ConvBNReLU(48, 64, 3, "torch")
    assert float(plain[0].weight.detach().std()) < 0.5 * math.sqrt(2 / (64 * 9))
    conv2 = nn.Conv2d(8, 4, 1, bias=True)
    torch.manual_seed(1)
    mmcv_kaiming_(conv2)
    assert torch.equal(conv2.bias, torch.zeros(4))


def test_precision_is_fp32_as_farl():
    """FaRL fine-tunes in fp32 (its network .float(), enable_amp False): under farl the step's autocast is a
    no-op, bit-identical to a plain fp32 forward; bf16 (ours on GPUs) is selectable and differs."""
    assert EvalConfig(task="alignment").resolved().precision == "fp32"
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", enabled=False):
        ref = lin(x)
    with autocast_for(torch.device("cpu"), "fp32")():
        ours = lin(x)
    with autocast_for(torch.device("cpu"), "bf16")():
        low = lin(x)
    assert torch.equal(ours, ref) and low.dtype == torch.bfloat16 and not torch.equal(low.float(), ref)
    assert autocast_for(torch.device("cpu"), "auto")().__class__.__name__ == "nullcontext"


def test_farl_choices_are_the_default_and_each_is_selectable():
    """--protocol farl resolves every item to FaRL's; each can be set to ours, and the run records whose."""
    cfg = EvalConfig(task="parsing", data="d", encoder="e", out="o")
    assert {k: v for k, (v, _) in cfg.choices().items()} == FARL_CHOICES
    assert all(whose == "FaRL" for _, whose in cfg.choices().values())
    ours = EvalConfig(task="parsing", data="d", encoder="e", out="o", auc_grid="closed", precision="bf16",
                      head_init="torch", ema_warmup=True, warp_frame="centre", absent_class="skip", eval_every="end")
    assert all(whose == "ours" for _, whose in ours.validate().choices().values())
    with pytest.raises(ValueError, match="--auc-grid"):
        EvalConfig(task="alignment", data="d", encoder="e", out="o", auc_grid="trapezoid").validate()
    with pytest.raises(ValueError, match="--eval-every"):
        EvalConfig(task="alignment", data="d", encoder="e", out="o", eval_every="0").validate()
