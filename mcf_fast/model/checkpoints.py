"""Reading foreign ViT checkpoints: MoCo v3, MAE, timm / plain state dicts, safetensors, and ours.

Everything is loaded with `weights_only=True` (or safetensors): an untrusted file cannot run code
(`safe_load` allows exactly the inert containers training checkpoints carry, such as `args`).
A checkpoint whose keys do not fit is an error naming the missing and unexpected keys, and weights of
a non-float dtype or with non-finite values are refused by name; nothing is ever loaded partially by
accident. `layouts` recognises whole training checkpoints (reference code, MAE, MoCo v3, ours).
"""
from __future__ import annotations

import os
import re

import torch

from mcf_fast.safe_load import safe_torch_load

# Keys under which checkpoint files wrap their state dict, tried in this order.
WRAPPERS = ("state_dict", "model", "module", "model_state")


def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(flat {name: tensor}, meta) of a file: safetensors, or a weights-only torch checkpoint whose state
    dict may sit under one of WRAPPERS; meta keeps the file's plain extras (epoch, args, safetensors
    metadata). A global `module.` prefix (a DDP-wrapped model saved as is) is stripped."""
    if not path:
        raise ValueError("empty checkpoint path: give checkpoint:/path/to/file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (check the path; nothing was loaded)")
    if os.path.isdir(path):
        cand = os.path.join(path, "encoder.safetensors")
        if not os.path.exists(cand):
            raise IsADirectoryError(f"{path!r} is a folder: give the checkpoint file (e.g. .pth, .safetensors)")
        path = cand
    meta: dict = {"path": path}
    if path.endswith(".safetensors"):
        from mcf_fast.safe_load import load_safetensors
        sd, more = load_safetensors(path)  # a garbled or pickled file is one RefusedFile line
        meta.update(more)
    else:
        obj = safe_torch_load(path)
        sd = obj
        if isinstance(obj, dict):
            for key in WRAPPERS:
                if isinstance(obj.get(key), dict):
                    sd = obj[key]
                    meta.update({k: v for k, v in obj.items() if k in ("epoch", "args", "arch")})
                    meta["wrapper"] = key
                    break
        if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
            found = type(sd).__name__ if not isinstance(sd, dict) else \
                [f"{k}: {type(v).__name__}" for k, v in sd.items() if not torch.is_tensor(v)][:6] or "an empty dict"
            top = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path!r} is not a state dict of tensors (found {found}; top-level keys {top}). "
                             f"Expected tensors, directly or under one of {list(WRAPPERS)}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        meta["ddp"] = True
    return dict(sd), meta


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a file into a flat {name: tensor} dict (see `read_file`)."""
    return read_file(path)[0]


def infer_vit_arch(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """ViT hyper-parameters read off the tensor shapes (heads are not in the weights: D // 64 default)."""
    w = sd["patch_embed.proj.weight"]
    D, C, p, _ = w.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    L = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else None
    grid = int(round(L ** 0.5)) if L else 224 // p
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    return dict(img_size=grid * p, patch_size=p, in_chans=C, embed_dim=D, depth=depth,
                num_heads=num_heads or max(1, D // 64), mlp_ratio=hidden / D,
                qkv_bias="blocks.0.attn.qkv.bias" in sd)


def check_tensors(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights whose dtype is not a float where the model holds floats (an int32 or bool tensor
    would be cast silently and train to non-finite steps), and floats with NaN / inf values."""
    for k, v in sd.items():
        if k not in own:
            continue
        if own[k].is_floating_point() and not v.is_floating_point():
            raise ValueError(f"checkpoint {source!r}: tensor {k!r} has dtype {v.dtype}, not a float dtype (the "
                             f"model holds {own[k].dtype}): the file is not a set of trained weights; re-export it "
                             "with float tensors")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"checkpoint {source!r}: tensor {k!r} holds {bad} non-finite value(s) (NaN/inf) of "
                             f"{v.numel()}: the weights are broken (a diverged run?); use an earlier checkpoint")


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that lists what is missing and what is unexpected; dtypes and finiteness
    checked (`check_tensors`) before anything is copied."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:10]]
        raise ValueError(f"checkpoint {source!r} does not fit the model: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}; shape mismatches {shapes}")
    check_tensors(own, sd, source)
    module.load_state_dict(sd, strict=True)


def load_mae_decoder(model, path: str, num_blocks: int = -1) -> list[str]:
    """Initialise the MCF decoder from an MAE checkpoint: embed + mask token, the first `num_blocks`
    blocks (-1 = all), and norm + pixel head only when every block is loaded. Returns loaded keys."""
    sd = read_state_dict(path)
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "decoder_embed.weight" not in sd:
        raise ValueError(f"{path!r} has no MAE decoder (no 'decoder_embed.weight'); give an MAE pre-training "
                         "checkpoint such as mae_pretrain_vit_base_full.pth")
    have = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder_blocks\.(\d+)\.", k))), default=-1)
    depth = len(model.decoder_blocks)
    n = depth if num_blocks < 0 else num_blocks
    if n > depth or n > have:
        raise ValueError(f"asked to load {n} decoder blocks but the model has {depth} and {path!r} has {have}")
    want = ["decoder_embed.", "mask_token"] + [f"decoder_blocks.{i}." for i in range(n)]
    if n == depth:
        want += ["decoder_norm.", "decoder_pred."]
    own = model.state_dict()
    picked = {k: v for k, v in sd.items() if any(k.startswith(w) for w in want)}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in picked.items()
             if k in own and own[k].shape != v.shape]
    absent = [k for k in own if any(k.startswith(w) for w in want) and k not in picked and "pos_embed" not in k]
    if wrong or absent:
        raise ValueError(f"MAE decoder in {path!r} does not fit: shape mismatches {wrong[:10]}, "
                         f"missing {absent[:10]}")
    check_tensors(own, picked, path)
    model.load_state_dict(picked, strict=False)
    return sorted(picked)
