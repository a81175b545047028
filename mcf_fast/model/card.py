"""MODEL_CARD.md: what an exported encoder holds, written beside encoder.safetensors + encoder.json.

Pre-training's export writes it (`write_model_card`): architecture and parameter count (read back from
the files just written), the normalisation the encoder expects, the data it saw (source, samples, images
seen), steps and epochs, the recipe, the teacher, the code's git revision, and the commands that made it.
Downstream evaluation adds its scores and commands (`add_eval_scores`) once it has run on these very
weights: the card records the weights' digest, and an evaluation of other bytes is not written into it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys

log = logging.getLogger(__name__)

CARD = "MODEL_CARD.md"
CHUNK = 1 << 20  # bytes per read while hashing
EVALS = "<!-- evaluations -->"
NO_EVALS = "(none yet: `python -m mcf_fast.eval paper --encoder {path} --aflw19 DIR --lapa DIR --out OUT` adds them)"
_DIGEST = re.compile(r"<!-- encoder-digest: ([0-9a-f]{64}) -->")


def files_digest(paths: list[str], extra: bytes = b"") -> str:
    """SHA-256 (hex) over `extra`, then each file's name and bytes, streamed."""
    h = hashlib.sha256(extra)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is not a regular file (a digest reads its bytes)")
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
    return h.hexdigest()


def export_digest(folder: str) -> str:
    """The digest of an export: encoder.safetensors then encoder.json (what `mcf_fast.eval` keys on)."""
    return files_digest([os.path.join(folder, "encoder.safetensors"), os.path.join(folder, "encoder.json")])


def git_revision() -> str:
    """The mcf_fast checkout's commit (+ '-dirty' with uncommitted changes), or why it is unknown."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return sha.stdout.strip() + ("-dirty (uncommitted changes)" if dirty else "")


def _safetensors_params(path: str) -> int:
    """Parameter count from the safetensors header (8-byte length, then JSON), without loading the tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(min(n, 100 << 20)))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            count = 1
            for d in t["shape"]:
                count *= d
            total += count
    return total


def _teacher(model: dict) -> str:
    t = model.get("teacher", "")
    kind, _, path = t.partition(":")
    if kind == "checkpoint":
        file = path.partition("#")[0]
        digest = files_digest([file])[:16] if os.path.isfile(file) else "file not found at export"
        return f"checkpoint `{path}` (sha256 {digest}...), layers {model.get('teacher_layers')}"
    if kind == "random":
        return (f"random ViT ({model.get('teacher_embed_dim')}-d, {model.get('teacher_depth')} blocks, patch "
                f"{model.get('teacher_patch_size')}, {model.get('teacher_img_size')} px), layers "
                f"{model.get('teacher_layers')}")
    return {"ema": "the EMA target encoder itself", "pixel": "pixels (MAE's reconstruction loss)"}.get(kind, t)


def _commands(out: str, world_size: int) -> list[str]:
    lines = []
    if os.path.basename(sys.argv[0]) in ("pretrain.py", "mcf-pretrain") and len(sys.argv) > 1:
        launch = (["torchrun", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"])
        lines.append(f"- as run: `{shlex.join(launch + ['-m', 'mcf_fast.pretrain', *sys.argv[1:]])}`")
    else:
        lines.append("- as run: from Python (`mcf_fast.train.loop.train`) with the configuration in config.json")
    cfg = os.path.join(os.path.abspath(out), "config.json")
    lines.append(f"- to reproduce: `python -m mcf_fast.pretrain --config {shlex.quote(cfg)} --out NEW_FOLDER`")
    return lines


def _timm_args(meta: dict) -> str:
    """timm.create_model's model name for this architecture, with the sizes spelled out when timm has no name
    for them (any ViT config of timm accepts them as keyword overrides)."""
    if meta.get("timm_name"):
        return f'"{meta["timm_name"]}"'
    sizes = ", ".join(f"{k}={meta[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"))
    return f'"vit_base_patch16_224", {sizes}'


def _section(title: str, rows: list[str]) -> list[str]:
    return [f"## {title}", "", *rows, ""]


def write_model_card(out: str, config: dict, *, steps: int, steps_per_epoch: int, eff_batch: int,
                     num_samples: int | None = None, world_size: int = 1, precision: str = "") -> str:
    """Write OUT/MODEL_CARD.md for the export in OUT (encoder.safetensors + encoder.json); returns its path."""
    st, js = os.path.join(out, "encoder.safetensors"), os.path.join(out, "encoder.json")
    with open(js) as f:
        meta = json.load(f)
    m, d, o = config.get("model", {}), config.get("data", {}), config.get("optim", {})
    params = _safetensors_params(st)
    source = d.get("path") or "synthetic faces (mcf_fast.data.synthetic)"
    seen = steps * eff_batch
    lr = o.get("lr") or (o.get("blr", 0) * eff_batch / 256)
    lines = [f"# Model card: {os.path.basename(os.path.abspath(out))}", "",
             "An encoder pre-trained with MCF (masked image modelling judged by a frozen teacher's features + a "
             "MoCo v3 contrastive loss between two masks) by mcf_fast: `encoder.safetensors` (weights, timm's "
             "key names, no head) and `encoder.json` (architecture, normalisation).", ""]
    lines += _section("Load it", [
        "- `from mcf_fast.model.vit import load_encoder; encoder = load_encoder(\"encoder.safetensors\")`",
        "- `torch.hub.load(\"PATH/TO/mcf_fast\", \"mcf_encoder\", source=\"local\", weights=\"encoder.safetensors\")`",
        f"- timm: `timm.create_model({_timm_args(meta)}, pretrained=True, num_classes=0, "
        "pretrained_cfg_overlay=dict(file=\"encoder.safetensors\"))`"])
    lines += _section("What it is", [
        f"- architecture: ViT, {meta['embed_dim']}-d, {meta['depth']} blocks, {meta['num_heads']} heads, patch "
        f"{meta['patch_size']}, MLP ratio {meta['mlp_ratio']}, input {meta['img_size']} px"
        + (f" (timm name `{meta['timm_name']}`)" if meta.get("timm_name") else ""),
        f"- parameters: {params:,}",
        f"- input: RGB in [0, 1], then (x - mean) / std with mean {meta.get('norm_mean')}, std {meta.get('norm_std')}"
        f" (encoder.json; the run's data section: mean {d.get('mean')}, std {d.get('std')})"])
    lines += _section("What it saw", [
        f"- data: {source}" + (f", {num_samples:,} samples per epoch" if num_samples else ""),
        f"- {steps:,} optimizer steps x effective batch {eff_batch} = {seen:,} images seen "
        f"({steps / max(1, steps_per_epoch):.2f} epochs of {steps_per_epoch:,} steps)",
        f"- augmentation: resize to {d.get('img_size')} px, horizontal flip {d.get('hflip')}, random resized "
        f"crop {d.get('random_resized_crop')}"])
    lines += _section("Recipe", [
        f"- preset `{config.get('preset')}`; mask ratio {m.get('mask_ratio')} ({m.get('mask_kind')}), loss "
        f"{m.get('perceptual_weight')} x perceptual + {m.get('contrastive_weight')} x contrastive (T "
        f"{m.get('temperature')}), EMA momentum {o.get('momentum')} ({o.get('momentum_schedule')})",
        f"- AdamW lr {lr:.3g} (blr {o.get('blr')}), betas ({o.get('beta1')}, {o.get('beta2')}), weight decay "
        f"{o.get('weight_decay')}, warm-up {o.get('warmup_steps') or o.get('warmup_epochs')} "
        f"{'steps' if o.get('warmup_steps') else 'epochs'}, cosine; batch {o.get('batch_size')} x accum "
        f"{o.get('accum_steps')} x {world_size} ranks; precision {precision or config.get('run', {}).get('precision')}",
        f"- teacher: {_teacher(m)}",
        "- every setting: config.json in the run folder"])
    lines += _section("Provenance", [
        f"- mcf_fast git revision: {git_revision()}",
        f"- written {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        *_commands(out, world_size),
        f"<!-- encoder-digest: {export_digest(out)} -->"])
    lines += _section("Downstream evaluations", [NO_EVALS.format(path=shlex.quote(st)), EVALS])
    path = os.path.join(out, CARD)
    _write(path, "\n".join(lines))
    return path


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def add_eval_scores(encoder: str, key: str, block: str, digest: str) -> bool:
    """Put `block` (Markdown) under the card's downstream section, replacing the block with the same `key`,
    when a card beside `encoder` describes the weights whose digest is `digest`; False (logged) otherwise."""
    folder = encoder if os.path.isdir(encoder) else os.path.dirname(encoder) or "."
    path = os.path.join(folder, CARD)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        text = f.read()
    found = _DIGEST.search(text)
    if not found or found.group(1) != digest:
        log.warning("%s describes other weights than %s now holds; scores not recorded there", path, encoder)
        return False
    key = key.replace("-->", "")
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    entry = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + entry + text[text.index(end) + len(end):]
    else:
        text = re.sub(r"\(none yet: .*\)\n", "", text).replace(EVALS, f"{entry}\n{EVALS}")
    try:
        _write(path, text)
    except OSError as e:
        log.warning("could not update %s (%s); scores are in the run folder", path, e.strerror)
        return False
    return True
