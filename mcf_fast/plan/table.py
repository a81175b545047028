"""The sheet as text: one block per question (work, memory, time, wires, loader, disk, what to change)."""
from __future__ import annotations

from . import comms, memory

G = 1 << 30


def _gib(n) -> str:
    return f"{n / G:8.2f}"


def _num(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.3g} "


def _hours(h) -> str:
    if h is None:
        return "      -"
    return f"{h:7.1f}" if h < 1000 else f"{h:7.0f}"


def header(s: dict) -> list[str]:
    r = s["run"]
    lines = [f"mcf_fast plan: {r['preset']} on {r['world']} x {r['machine']} ({r['nodes']} node"
             f"{'s' if r['nodes'] > 1 else ''}), {r['precision']} ({r['precision_why']})",
             f"  batch {r['batch']} x accum {r['accum_steps']} x {r['world']} GPU{'s' if r['world'] > 1 else ''} "
             f"= {r['effective_batch']} images per optimizer step"]
    if r["max_steps"]:
        lines.append(f"  job: {r['optimizer_steps']:,} optimizer steps (--optim.max_steps)")
    elif r["images_per_epoch"]:
        lines.append(f"  job: {r['images_per_epoch']:,} images x {r['epochs']:g} epochs = "
                     f"{r['optimizer_steps']:,} optimizer steps")
    else:
        lines.append("  job: images per epoch unknown (give --images N)")
    return lines


def flops_block(s: dict) -> list[str]:
    f = s["flops"]
    total = f["per_image"]
    lines = ["", f"Work per image ({f['source']})", f"  {'part':34s} {'GFLOP':>9s} {'share':>7s}"]
    for part, v in f["by_part"].items():
        if v or part != "other":
            lines.append(f"  {part:34s} {v / 1e9:9.2f} {v / total:7.1%}")
    lines.append(f"  {'total (forward + backward)':34s} {total / 1e9:9.2f}")
    return lines


def memory_block(s: dict) -> list[str]:
    mem, r = s["memory"], s["run"]
    w = r["world"]
    how = f"FSDP2 over {w} GPUs: state sharded" if w > 1 else "one process: no sharding"
    sharded_teacher = w > 1 and s["run"]["teacher_sharding"] == "shard"
    held = "fp32" if w == 1 or sharded_teacher or r["precision"] != "bf16" else "bf16"
    notes = {"parameters": "fp32 master weights (online, target, heads)" + (", sharded" if w > 1 else ""),
             "teacher": f"frozen teacher, {held}" + (", sharded" if sharded_teacher else ", whole"),
             "gradients": "fp32" + (" shards" if w > 1 else ", at the peak"),
             "optimizer state": "AdamW moments, fp32" + (" shards" if w > 1 else ""),
             "activations": f"traced peak in {mem['peak_part']} ({mem['peak_phase']})",
             "FSDP buffers": "gathered units + gradients in flight" if w > 1 else "none"}
    lines = ["", f"Memory per GPU ({how})", f"  {'':34s} {'GiB':>8s}"]
    for k, v in mem["rows"].items():
        if k != "total":
            lines.append(f"  {k:34s} {_gib(v)}   {notes.get(k, '')}")
    lines.append(f"  {'allocated':34s} {_gib(mem['allocated'])}")
    extra = f"+ {mem['fragmentation']:.0%} fragmentation" + (f" + {mem['fixed'] / G:.1f} GiB context/NCCL"
                                                             if mem["fixed"] else "")
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"  {'needed':34s} {_gib(mem['needed'])}   of {mem['capacity'] / G:.1f} GiB: {verdict} "
                 f"({extra})")
    parts = sorted(mem.get("peak_by_part", {}).items(), key=lambda kv: -kv[1])
    if parts:
        lines.append("  activations at the peak, by where they were made: "
                     + ", ".join(f"{k} {v / G:.2f}" for k, v in parts if v >= 0.005 * G))
    return lines


def speed_block(s: dict) -> list[str]:
    sp = s["speed"]
    lines = ["", f"Speed per GPU (MFU: share of the {sp['peak_flops'] / 1e12:.4g} TFLOP/s peak, {sp['peak_source']})",
             f"  {'':7s} {'MFU':>5s} {'img/s/GPU':>10s} {'step s':>8s} {'job h':>7s}   source"]
    for name, v in sp["range"].items():
        lines.append(f"  {name:7s} {v['mfu']:5.0%} {v['images_per_s_per_gpu']:10.1f} {v['step_s']:8.2f} "
                     f"{_hours(v['hours'])}   {v['source']}")
    return lines


def comms_block(s: dict) -> list[str]:
    c = s["comms"]
    if c["per_step"]["total"] == 0:
        return ["", "Collectives: none (one process)"]
    parts = ", ".join(f"{k} {v / G:.2f}" for k, v in c["per_step"].items() if k != "total" and v)
    head = f"Collectives per optimizer step, per GPU: {c['per_step']['total'] / G:.2f} GiB ({parts})"
    if not c["rate"]:
        return ["", head, "  no link speed is known for this machine"]
    return ["", head,
            f"  over {c['over']} at {c['rate'] / 1e9:.0f} GB/s ({comms.LINK_EFFICIENCY:.0%} of the link): "
            f"{c['seconds']:.3f} s = {c['share_of_likely_step']:.0%} of the likely step "
            f"({'can overlap with compute' if c['share_of_likely_step'] < 1 else 'the link limits the step'})"]


def loader_block(s: dict) -> list[str]:
    ld = s["loader"]
    if ld is None:
        return ["", "Loader: not planned (the sheet was made without measuring the loader)"]
    where = (f"measured here: {ld['decoder']} decode + resize/crop/flip of {ld['source_px']} px JPEGs, per second of "
             f"one core's CPU time, load average {ld['load_average']:.1f}") if ld["measured"] else "given"
    cores = " / ".join(f"{k} {v:.1f}" for k, v in ld["cores_per_gpu"].items())
    lines = ["", f"Loader: {ld['images_per_s_per_core']:.0f} images/s per core ({where})",
             f"  CPU cores per GPU for the torch loader: {cores} (low / likely / high speed)"]
    if ld["measured"]:
        lines.append("  decode + augment only, on synthetic faces: real photos decode slower and the loader adds "
                     "reading and batching; --loader-rate takes a rate measured on your data")
    return lines


def storage_block(s: dict) -> list[str]:
    st = s["storage"]
    lines = ["", f"Disk: checkpoint {st['checkpoint'] / G:.2f} GiB (model without teacher + AdamW state, fp32); "
                 f"{st['checkpoints_kept']} kept + 1 being written = {st['checkpoint_disk'] / G:.2f} GiB"]
    if st["checkpoints_written"]:
        lines.append(f"  {st['checkpoints_written']:,} checkpoints written over the job; encoder export "
                     f"{st['encoder_export'] / (1 << 20):.0f} MiB")
    if st["shards"]:
        src = {"given": "given", "measured": "synthetic faces here: real photos compress less, give --image-kb"}
        lines.append(f"  shards: {st['bytes_per_image'] / 1024:.1f} KiB per image ({src[st['bytes_source']]}) -> "
                     f"{st['shards'] / G:,.1f} GiB")
    return lines


def fixes_block(s: dict) -> list[str]:
    if s["memory"]["fits"]:
        return []
    lines = ["", "To fit (each traced; predicted memory per GPU, work and speed at the likely MFU):"]
    for f in s["fixes"]:
        lines.append(f"  {f['switch']:46s} {f['needed'] / G:7.2f} GiB {'fits' if f['fits'] else 'no':5s}"
                     f"work {f['flops_change']:+.0%}  {f['images_per_s_per_gpu']:.0f} img/s/GPU"
                     + (f"  traffic {f['traffic_per_step'] / G:.2f} GiB/step" if f["traffic_per_step"] else ""))
    return lines


def assumptions_block(s: dict) -> list[str]:
    t = s["trace"]
    notes = [f"Note: {n}" for n in t.get("notes", [])]
    return [""] + notes + ["Assumptions: MFU anchors as listed; GPU memory headroom "
                f"{memory.GPU_FRAGMENTATION:.0%} + {memory.GPU_CONTEXT / G:.0f} GiB context"
                f" (+ {memory.NCCL_BUFFERS / G:.1f} GiB NCCL); collectives at {comms.LINK_EFFICIENCY:.0%} of the "
                "link; the eager step (no torch.compile).",
            f"  traced {t['micro_steps']} micro-batch{'es' if t['micro_steps'] > 1 else ''} in "
            f"{t['seconds']:.1f} s" + (f"; parts not labelled: {t['unlabelled_parts']}" if t["unlabelled_parts"]
                                      else "")]


def render(s: dict) -> str:
    blocks = (header, flops_block, memory_block, speed_block, comms_block, loader_block, storage_block,
              fixes_block, assumptions_block)
    return "\n".join(line for b in blocks for line in b(s))


__all__ = ["render"]
