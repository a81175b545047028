"""The `step` suite: the engine's full training step vs the reference step, per (preset, precision).

Engine step: `mcf_fast.train.step.TrainStep`, the object `mcf_fast.train.loop.train` calls once per
optimizer step (accum 1, no clipping here), with the loop's `MetricsWindow.add` after it: next batch,
`random_masks(views=2)`, `ema_update` (foreach), forward under autocast, backward, foreach grad norm
and finiteness flag, fused AdamW with the device-side skip (`found_inf`), `zero_grad`. Nothing of it
is restated here; the step reports its phase boundaries through its `mark` hook.
Reference step: `mcf_fast.model.reference` as the public reference code runs it (MAE's engine):
noise from `torch.rand`, `ref_ema` (Python loop), `ref_losses` (argsort masking, expanded gathers,
all patches embedded, teacher's real pass under autograd, full logits), `loss.item()` each step,
MAE's per-parameter grad-norm loop, `torch.optim.AdamW` with its defaults (foreach=None,
fused=None: the single-tensor for-loop on CPU, foreach on CUDA), `zero_grad()`.
Both: same model (same seed), ViT-B/16 random teacher at 224 for the 224 presets (the paper's
teacher size), same batch, same precision, the same synthetic-face loader (workers=0) as data.

Each configuration runs in a child process (`--child SPEC.json OUT.json`) holding one engine and one
reference copy of the model: the losses are checked equal for the same masks first, FLOPs are
counted under FakeTensorMode (no compute), then engine and reference steps alternate (so machine
load hits both alike), then each provider's peak memory is measured on one more step.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

AC = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- FLOP counting
def _sdpa_cpu_mapping():
    """FlopCounterMode counts the CUDA SDPA kernels but not the CPU flash kernel: add it (same formulas)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def fwd(q, k, v, *a, out_shape=None, **kw):
        return sdpa_flop_count(q, k, v)

    def bwd(g, q, k, v, *a, out_shape=None, **kw):
        return sdpa_backward_flop_count(g, q, k, v)
    m = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        m[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        m[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return m


def count_flops(fn, params) -> dict:
    """FLOPs of `fn()` (forward + backward) counted on fake tensors: {'total', 'by_op'}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_mapping()) as fc:
            fn()
    for p in params:  # the fake backward attached fake .grad tensors to the real parameters
        p.grad = None
    return {"total": fc.get_total_flops(), "by_op": {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}}


# ----------------------------------------------------------------------------- the two steps
class PhaseTimer:
    """Marks phase boundaries: perf_counter on CPU (ops are synchronous), CUDA events on GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []
        self.mark("start")

    def mark(self, name):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def result(self) -> dict:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return {"data": out["data"], "forward": out["forward"], "backward": out["backward"],
                "optimizer_ema": out["ema"] + out["optimizer"], "total": sum(out.values())}


def _autocast(device, precision):  # the reference step and the checks (the engine's is the Runtime's)
    dt = AC[precision]
    return torch.autocast(device.type, dtype=dt) if dt is not None else torch.autocast(device.type, enabled=False)


class TimedTrainStep:
    """The loop's own step object (`mcf_fast.train.step.TrainStep`) and window fold, timed by phase."""

    def __init__(self, model, cfg, loader, device, precision):
        from mcf_fast.train.optim import build_optimizer
        from mcf_fast.train.runtime import Runtime
        from mcf_fast.train.step import TrainStep
        from mcf_fast.train.window import MetricsWindow
        cfg = copy.deepcopy(cfg)
        cfg.optim.accum_steps, cfg.optim.clip_grad, cfg.run.seed = 1, 0.0, 0
        self.cfg, self.device = cfg, device
        o = cfg.optim
        self.optimizer = build_optimizer(model, 1.5e-4, o.weight_decay, (o.beta1, o.beta2), device)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # as loop.wire
        self.step = TrainStep(model, self.optimizer, cfg, Runtime(device, precision, 0, 1, 0), scaler)
        self.window = MetricsWindow(device)
        self.batches, self.step_i = iter(loader), 0

    def __call__(self) -> dict:
        from mcf_fast.train.optim import ema_momentum
        o, T = self.cfg.optim, PhaseTimer(self.device)
        m = ema_momentum(self.step_i, 1000, o.momentum, o.momentum_schedule)
        self.window.add(self.step(self.batches, self.step_i, 1.5e-4, m, mark=T.mark))
        T.mark("optimizer")  # the window fold counts with the optimizer phase
        self.step_i += 1
        return T.result()


class ReferenceStep:
    """MAE's train_one_epoch around mcf_fast.model.reference (see the module docstring)."""

    def __init__(self, model, cfg, loader, device, precision):
        from mcf_fast.train.optim import param_groups
        self.model, self.cfg, self.device, self.precision = model, cfg, device, precision
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1.5e-4,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.it = iter(loader)
        self.L = model.encoder.num_patches

    def __call__(self) -> dict:
        from mcf_fast.model.reference import ref_ema, ref_losses
        T = PhaseTimer(self.device)
        imgs = next(self.it).images
        N = imgs.shape[0]
        noise1 = torch.rand(N, self.L, device=self.device)
        noise2 = torch.rand(N, self.L, device=self.device)
        T.mark("data")
        ref_ema(self.model, self.cfg.optim.momentum)
        T.mark("ema")
        with _autocast(self.device, self.precision):
            loss = ref_losses(self.model, imgs, self.cfg.model.mask_ratio, noise1, noise2)[0]
        loss_value = loss.item()  # MAE logs (and checks) the loss on the host every step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"reference loss is {loss_value}")
        T.mark("forward")
        loss.backward()
        T.mark("backward")
        # MAE's NativeScalerWithGradNormCount without clipping: get_grad_norm_ (one norm per tensor)
        torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in self.params if p.grad is not None]), 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        T.mark("optimizer")
        return T.result()


# ----------------------------------------------------------------------------- the child process
def _config(preset):
    from mcf_fast.train.config import from_preset
    cfg = from_preset(preset)
    if cfg.model.teacher.startswith("checkpoint:"):
        cfg.model.teacher = "random"  # the paper's teacher size (ViT-B/16 at 224), weights need no download
    cfg.data.workers = 0
    cfg.data.path = ""
    return cfg


def _loader(cfg, batch, device):
    from mcf_fast.data import build_pretrain_loader
    return build_pretrain_loader(cfg.data, batch_size=batch, rank=0, world_size=1, seed=0, device=device)


def check_losses(model, cfg, device, precision, batch) -> dict:
    """Engine and reference losses for the same images and masks (reference fed `noise_for` them)."""
    from mcf_fast.masking import random_masks
    from mcf_fast.model.reference import noise_for, ref_losses
    b = next(iter(_loader(cfg, batch, device)))
    L = model.encoder.num_patches
    mk = random_masks(batch, L, cfg.model.mask_ratio, views=2, seed=0, step=0, sample_ids=b.sample_ids, device=device)
    n1, n2 = noise_for(mk.ids_keep[0], L), noise_for(mk.ids_keep[1], L)
    with torch.no_grad():
        with _autocast(device, precision):
            eng = model(b.images, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1]).loss.float()
            ref = ref_losses(model, b.images, cfg.model.mask_ratio, n1, n2)[0].float()
        if precision == "fp32":
            H.check_close("engine loss (fp32)", eng, ref, rtol=1e-4, atol=1e-6)
            return {"engine_loss": float(eng), "reference_loss": float(ref), "rule": "rtol 1e-4"}
        ref32 = ref_losses(model, b.images, cfg.model.mask_ratio, n1, n2)[0].float()
    # three-way: the engine's low-precision error may be at most twice the reference's own (+ 0.1% slack)
    allowed = 2 * abs(float(ref) - float(ref32)) + 1e-3 * abs(float(ref32))
    if not abs(float(eng) - float(ref32)) <= allowed:
        raise H.ProviderMismatch(f"engine loss {float(eng):.6g} vs fp32 reference {float(ref32):.6g}: off by more "
                                 f"than {allowed:.3g} (2x the reference's own {precision} error + 0.1%)")
    return {"engine_loss": float(eng), "reference_loss": float(ref), "reference_loss_fp32": float(ref32),
            "rule": "three-way: |eng - ref32| <= 2 |ref_lowp - ref32| + 1e-3 |ref32|"}


def _flops_of(model, cfg, device, precision, batch, which) -> dict:
    from mcf_fast.masking import random_masks
    from mcf_fast.model.reference import ref_losses
    L, S = model.encoder.num_patches, cfg.model.img_size
    mk = random_masks(batch, L, cfg.model.mask_ratio, views=2, seed=0, step=0, device=device)

    def run():
        imgs = torch.randn(batch, 3, S, S, device=device)
        with _autocast(device, precision):
            if which == "engine":
                loss = model(imgs, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1]).loss
            else:
                loss = ref_losses(model, imgs, cfg.model.mask_ratio, torch.rand(batch, L, device=device),
                                  torch.rand(batch, L, device=device))[0]
        loss.float().backward()
    return count_flops(run, model.parameters())


def _teacher_flops(model, cfg, device, precision, batch) -> float | None:
    """FLOPs of the perceptual loss alone (teacher on pred with input-grad backward + real pass)."""
    if model.perceptual is None:
        return None
    S = cfg.model.img_size

    def run():
        pred = torch.randn(batch, 3, S, S, device=device, requires_grad=True)
        with _autocast(device, precision):
            loss = model.perceptual(pred, torch.randn(batch, 3, S, S, device=device), model._teacher_vit())
        loss.float().backward()
    return count_flops(run, model.parameters())["total"]


def _choose_batch(engine_model, cfg, device, spec, left_s, steps_per_provider, out) -> tuple[int, str]:
    """(batch, why): the largest batch whose predicted cost fits what is left of the budget, from a
    batch-2 probe of the engine step; (0, '') with out['skipped'] set when none fits."""
    prec = spec["precision"]
    eng2 = TimedTrainStep(engine_model, cfg, _loader(cfg, 2, device), device, prec)
    t0 = time.perf_counter()
    probe = eng2()["total"] / 1e3 / 2  # batch 2, first call (lazy init included): an upper bound per image
    if probe * 2 < 0.1 * spec["budget_s"]:  # cheap: a second call (no lazy init) gives a truer rate
        probe = eng2()["total"] / 1e3 / 2
    del eng2  # its optimizer state must not sit in the memory baseline
    engine_model.zero_grad(set_to_none=True)
    out["probe_s"] = probe
    left = left_s - (time.perf_counter() - t0) - 10
    # cost ~ both providers' steps + check (~3 forwards) + profile step, reference ~1.2x the engine
    ladder = [b for b in (64, 32, 16, 8, 4, 2) if b <= spec["max_batch"]]
    fits = [b for b in ladder if (2.2 * steps_per_provider + 2) * probe * b <= left]
    if not fits:
        out["skipped"] = (f"not measured: one {prec} step at batch 2 took {2 * probe:.1f} s here; "
                          f"{2 * steps_per_provider + 2} steps exceed this configuration's budget of {max(left, 0):.0f} s")
        return 0, ""
    return fits[0], (f"largest of {ladder} whose predicted cost fits the {spec['budget_s']:.0f} s budget "
                     f"(batch-2 probe step {2 * probe:.2f} s)")


def child(spec: dict) -> dict:
    """One (preset, precision) configuration; see the module docstring. `spec`: preset, precision,
    device, budget_s, max_batch, batch (fixed or 0 = choose), reps, warmup, profile."""
    from mcf_fast.model.mcf import MCFModel
    t0 = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg, prec = _config(spec["preset"]), spec["precision"]
    out = {"spec": spec, "preset": spec["preset"], "precision": prec}
    engine_model = MCFModel.from_config(cfg.model, seed=0).to(device).train()
    # BatchNorm in the heads needs >= 2 samples in training mode: batch 2 is the smallest step.
    fixed = spec.get("batch") or 0
    f_fixed = _flops_of(engine_model, cfg, device, prec, fixed, "engine") if fixed else None
    f1 = (f_fixed["total"] / fixed) if fixed else _flops_of(engine_model, cfg, device, prec, 2, "engine")["total"] / 2
    out["flops_per_image_engine"] = f1
    peak = spec["peak_flops"]
    steps_per_provider = spec["warmup"] + spec["reps"] + 1
    # Lower bound on the cost at batch 2: both providers at 100% of the measured matmul peak.
    floor_s = 2 * steps_per_provider * 2 * f1 / peak
    left = spec["budget_s"] - (time.perf_counter() - t0)
    if floor_s > left:
        out["skipped"] = (f"not measured: the run's --budget-s was used up before this configuration ({max(left, 0):.0f} s "
                          f"left for it; its {2 * steps_per_provider} steps need at least {floor_s:.1f} s even at batch 2 "
                          f"and the measured {prec} matmul peak); give a larger --budget-s or run --suite step alone")
        return out
    batch, why = spec.get("batch") or 0, "fixed (--step-batch or --quick)"
    if not batch:
        batch, why = _choose_batch(engine_model, cfg, device, spec, spec["budget_s"] - (time.perf_counter() - t0),
                                   steps_per_provider, out)
        if not batch:
            return out
    out.update(batch=batch, batch_reason=why)
    out["check"] = check_losses(engine_model, cfg, device, prec, batch)
    out["flops_engine"] = f_fixed or _flops_of(engine_model, cfg, device, prec, batch, "engine")
    out["flops_teacher"] = _teacher_flops(engine_model, cfg, device, prec, batch)
    ref_model = MCFModel.from_config(cfg.model, seed=0).to(device).train()
    out["flops_reference"] = _flops_of(ref_model, cfg, device, prec, batch, "reference")
    eng = TimedTrainStep(engine_model, cfg, _loader(cfg, batch, device), device, prec)
    ref = ReferenceStep(ref_model, cfg, _loader(cfg, batch, device), device, prec)
    phases = {"engine": [], "reference": []}
    for i in range(spec["warmup"] + spec["reps"]):  # alternate: load from other processes hits both alike
        for name, step in (("engine", eng), ("reference", ref)):
            r = step()
            if i >= spec["warmup"]:
                phases[name].append(r)
    out["phases"] = phases
    mem = {}
    for name, step, model, opt in (("engine", eng, engine_model, eng.optimizer),
                                   ("reference", ref, ref_model, ref.optimizer)):
        model.zero_grad(set_to_none=True)
        mem[name] = {"state_bytes": H.state_bytes(model, opt), "step_bytes": H.peak_bytes(step, device)}
    out["memory"] = mem
    # The MFU denominator again, here and now: the run keeps the best of all its measurements, so
    # a burst of load from other processes during one measurement cannot inflate the MFU.
    out["matmul_peak"] = H.matmul_peak(AC[prec] or torch.float32, device, budget_s=4.0)
    if spec.get("profile"):
        out["profile"] = profile_table(eng, device)
    out["wall_s"] = time.perf_counter() - t0
    return out


def profile_table(step, device, rows=30) -> str:
    """torch.profiler's top operators (by self time) over one engine step."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in keys + ("self_cpu_time_total",):  # the device key was renamed across torch versions
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return "(profiler table unavailable)"


def run_child(spec: dict, tmpdir: str, timeout_s: float) -> dict:
    """Run `child(spec)` in a fresh interpreter; a crash or time-out becomes a 'skipped' reason."""
    os.makedirs(tmpdir, exist_ok=True)
    tag = f"{spec['preset']}_{spec['precision']}"
    sp, op = os.path.join(tmpdir, f"spec_{tag}.json"), os.path.join(tmpdir, f"result_{tag}.json")
    with open(sp, "w") as f:
        json.dump(spec, f)
    if os.path.exists(op):
        os.remove(op)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", sp, op], capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"preset": spec["preset"], "precision": spec["precision"],
                "skipped": f"not measured: the configuration ran past its {timeout_s:.0f} s limit"}
    if p.returncode != 0 or not os.path.exists(op):
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"preset": spec["preset"], "precision": spec["precision"], "failed": True,
                "skipped": "FAILED: " + " / ".join(tail)}
    with open(op) as f:
        return json.load(f)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    with open(sys.argv[2]) as f:
        _spec = json.load(f)
    _res = child(_spec)
    with open(sys.argv[3], "w") as f:
        json.dump(_res, f)
