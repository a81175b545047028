"""One configuration of the `step` suite, measured in a child process: the engine's training step vs the
reference step, for one (preset, precision).

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

In order: the losses are checked equal for the same masks, FLOPs are counted on fake tensors, engine
and reference steps alternate (so machine load hits both alike), then each provider's peak memory
is measured on one more step. The child keeps to the wall-clock deadline in its spec (the parent
kills it at that deadline plus a grace period) and writes its result as JSON, errors included.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import traceback

import torch

from . import harness as H
from .engine import build_model, loader, preset_config
from .flops import count_flops
from .machine import matmul_peak

AC = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _phases(marks: dict) -> dict:
    return {"data": marks["data"], "forward": marks["forward"], "backward": marks["backward"],
            "optimizer_ema": marks["ema"] + marks["optimizer"], "total": sum(marks.values())}


def _autocast(device, precision):  # the reference step and the checks (the engine's is the Runtime's)
    dt = AC[precision]
    return torch.autocast(device.type, dtype=dt) if dt is not None else torch.autocast(device.type, enabled=False)


class TimedTrainStep:
    """The loop's own step object (`mcf_fast.train.step.TrainStep`) and window fold, timed by phase."""

    def __init__(self, model, cfg, batches, device, precision):
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
        self.batches, self.step_i = iter(batches), 0

    def __call__(self) -> dict:
        from mcf_fast.train.optim import ema_momentum
        o, T = self.cfg.optim, H.PhaseTimer(self.device)
        m = ema_momentum(self.step_i, 1000, o.momentum, o.momentum_schedule)
        self.window.add(self.step(self.batches, self.step_i, 1.5e-4, m, mark=T.mark))
        T.mark("optimizer")  # the window fold counts with the optimizer phase
        self.step_i += 1
        return _phases(T.result())


class ReferenceStep:
    """MAE's train_one_epoch around mcf_fast.model.reference (see the module docstring)."""

    def __init__(self, model, cfg, batches, device, precision):
        from mcf_fast.train.optim import param_groups
        self.model, self.cfg, self.device, self.precision = model, cfg, device, precision
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1.5e-4,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.it = iter(batches)
        self.L = model.encoder.num_patches

    def __call__(self) -> dict:
        from mcf_fast.model.reference import ref_ema, ref_losses
        T = H.PhaseTimer(self.device)
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
        return _phases(T.result())


def _masks(model, cfg, batch, device, sample_ids=None):
    from mcf_fast.masking import random_masks
    return random_masks(batch, model.encoder.num_patches, cfg.model.mask_ratio, views=2, seed=0, step=0,
                        sample_ids=sample_ids, device=device)


def _engine_loss(model, imgs, mk):
    return model(imgs, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1]).loss


def check_losses(model, cfg, device, precision, batch) -> dict:
    """Engine and reference losses for the same images and masks (reference fed `noise_for` them)."""
    from mcf_fast.model.reference import noise_for, ref_losses
    b = next(iter(loader(cfg, batch, device)))
    L = model.encoder.num_patches
    mk = _masks(model, cfg, batch, device, b.sample_ids)
    n1, n2 = noise_for(mk.ids_keep[0], L), noise_for(mk.ids_keep[1], L)
    with torch.no_grad():
        with _autocast(device, precision):
            eng = _engine_loss(model, b.images, mk).float()
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


def flops_of(model, cfg, device, precision, batch, which) -> dict:
    """Counted FLOPs of one forward + backward of the engine's or the reference's loss at `batch`."""
    from mcf_fast.model.reference import ref_losses
    L, S = model.encoder.num_patches, cfg.model.img_size
    mk = _masks(model, cfg, batch, device)

    def run():
        imgs = torch.randn(batch, 3, S, S, device=device)
        with _autocast(device, precision):
            if which == "engine":
                loss = _engine_loss(model, imgs, mk)
            else:
                loss = ref_losses(model, imgs, cfg.model.mask_ratio, torch.rand(batch, L, device=device),
                                  torch.rand(batch, L, device=device))[0]
        loss.float().backward()
    return count_flops(run, model.parameters())


def teacher_flops(model, cfg, device, precision, batch) -> float | None:
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


def choose_batch(engine_model, cfg, device, spec, left_s, steps_per_provider, out) -> tuple[int, str]:
    """(batch, why): the largest batch whose predicted cost fits what is left of the budget, from a
    batch-2 probe of the engine step; (0, '') with out['skipped'] set when none fits."""
    prec = spec["precision"]
    eng2 = TimedTrainStep(engine_model, cfg, loader(cfg, 2, device), device, prec)
    t0 = time.perf_counter()
    probe = eng2()["total"] / 1e3 / 2  # batch 2, first call (lazy init included): an upper bound per image
    if probe * 2 < 0.1 * left_s:  # cheap: a second call (no lazy init) gives a truer rate
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
                          f"{2 * steps_per_provider + 2} steps exceed the {max(left, 0):.0f} s of the budget left for it")
        return 0, ""
    return fits[0], f"largest of {ladder} whose predicted cost fits the budget (batch-2 probe step {2 * probe:.2f} s)"


def _alternate(eng, ref, warmup, reps, left) -> tuple[dict, float]:
    """Phases of each timed step, engine and reference alternating (load from other processes hits both
    alike), and the last round's seconds. After the first timed round, a round that would not fit in
    `left()` is not started: fewer samples, and the configuration is still reported."""
    phases, round_s = {"engine": [], "reference": []}, 0.0
    for i in range(warmup + reps):
        if i > warmup and left() < 1.5 * round_s:
            break
        t = time.perf_counter()
        for name, step in (("engine", eng), ("reference", ref)):
            r = step()
            if i >= warmup:
                phases[name].append(r)
        round_s = time.perf_counter() - t
    return phases, round_s


def measure_config(spec: dict) -> dict:
    """One (preset, precision) configuration; see the module docstring. `spec`: preset, precision,
    device, deadline (time.time() by which to be done), max_batch, batch (fixed, or 0 = choose),
    reps, warmup, profile, peak_flops, threads, share_s (its share of the budget, for the reasons)."""
    left = lambda: spec["deadline"] - time.time()  # noqa: E731 - the import time of this process counts
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg, prec = preset_config(spec["preset"]), spec["precision"]
    out = {"spec": spec, "preset": spec["preset"], "precision": prec}
    engine_model = build_model(cfg.model, 0).to(device).train()
    # BatchNorm in the heads needs >= 2 samples in training mode: batch 2 is the smallest step.
    fixed = spec.get("batch") or 0
    f_fixed = flops_of(engine_model, cfg, device, prec, fixed, "engine") if fixed else None
    f1 = (f_fixed["total"] / fixed) if fixed else flops_of(engine_model, cfg, device, prec, 2, "engine")["total"] / 2
    out["flops_per_image_engine"] = f1
    steps_per_provider = spec["warmup"] + spec["reps"] + 1
    floor_s = 2 * steps_per_provider * 2 * f1 / spec["peak_flops"]  # both providers at batch 2, at the matmul peak
    if left() <= 0:
        out["skipped"] = (f"not measured: its share of the budget was spent starting the process and building the "
                          f"models ({spec['share_s']:.0f} s); give a larger --budget-s or run --suite step alone")
        return out
    if floor_s > left():
        out["skipped"] = (f"not measured: {left():.0f} s of the budget were left for this configuration; its "
                          f"{2 * steps_per_provider} steps need at least {floor_s:.1f} s even at batch 2 and the measured "
                          f"{prec} matmul peak; give a larger --budget-s or run --suite step alone")
        return out
    batch, why = fixed, "fixed (--step-batch or --quick)"
    if not batch:
        batch, why = choose_batch(engine_model, cfg, device, spec, left(), steps_per_provider, out)
        if not batch:
            return out
    out.update(batch=batch, batch_reason=why)
    out["check"] = check_losses(engine_model, cfg, device, prec, batch)
    out["flops_engine"] = f_fixed or flops_of(engine_model, cfg, device, prec, batch, "engine")
    out["flops_teacher"] = teacher_flops(engine_model, cfg, device, prec, batch)
    ref_model = build_model(cfg.model, 0).to(device).train()
    out["flops_reference"] = flops_of(ref_model, cfg, device, prec, batch, "reference")
    eng = TimedTrainStep(engine_model, cfg, loader(cfg, batch, device), device, prec)
    ref = ReferenceStep(ref_model, cfg, loader(cfg, batch, device), device, prec)
    out["phases"], round_s = _alternate(eng, ref, spec["warmup"], spec["reps"], left)
    out["memory"] = {}
    for name, step, model, opt in (("engine", eng, engine_model, eng.optimizer),
                                   ("reference", ref, ref_model, ref.optimizer)):
        model.zero_grad(set_to_none=True)
        fits = left() > 1.5 * round_s  # one more step of each provider: the peak (else reported as not measured)
        out["memory"][name] = {"state_bytes": H.state_bytes(model, opt),
                               "step_bytes": H.peak_bytes(step, device) if fits else None}
    # The MFU denominator again, here and now: the run keeps the best of all its measurements, so
    # a burst of load from other processes during one measurement cannot inflate the MFU.
    if left() > 2.0:
        out["matmul_peak"] = matmul_peak(AC[prec] or torch.float32, device, budget_s=min(4.0, left() / 4))
    if spec.get("profile") and left() > round_s:
        out["profile"] = profile_table(eng, device)
    return out


def profile_table(step, device, rows=30) -> str:
    """torch.profiler's top operators (by self time) over one engine step."""
    # The profiler's library logs to stderr (a start/stop line each time, and on a CUDA build of torch with
    # no GPU an ERROR line about the device count); the report holds its table, so its log is silenced.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
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


def main(spec: dict, result_path: str) -> None:
    """The child process's entry: measure `spec`, write the result (or the error, as a FAILED reason) as JSON."""
    t0 = time.perf_counter()
    try:
        res = measure_config(spec)
    except Exception as e:  # noqa: BLE001 - the parent reports it as this configuration's FAILED row
        res = {"preset": spec["preset"], "precision": spec["precision"], "failed": True,
               "skipped": f"FAILED: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    res["wall_s"] = time.perf_counter() - t0
    with open(result_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(result_path + ".tmp", result_path)


__all__ = ["TimedTrainStep", "ReferenceStep", "check_losses", "flops_of", "teacher_flops", "measure_config", "main"]
