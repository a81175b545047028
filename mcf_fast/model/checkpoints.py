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


def _shape(v) -> tuple[int, ...]:
    """A tensor's shape, or a shape given as such (header-only readers give shapes, not tensors)."""
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def infer_vit_arch(sd: dict, num_heads: int | None = None) -> dict:
    """ViT hyper-parameters read off the tensor shapes (heads are not in the weights: D // 64 default).
    `sd` maps names to tensors or to shapes (a safetensors header read by `headers.safetensors_shapes`)."""
    for need in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if need not in sd:
            raise ValueError(f"no {need!r} among the weights: not a ViT in timm's names")
    D, C, p, _ = _shape(sd["patch_embed.proj.weight"])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    L = _shape(sd["pos_embed"])[1] - 1 if "pos_embed" in sd else None
    grid = int(round(L ** 0.5)) if L else 224 // p
    hidden = _shape(sd["blocks.0.mlp.fc1.weight"])[0]
    return dict(img_size=grid * p, patch_size=p, in_chans=C, embed_dim=D, depth=depth,
                num_heads=num_heads or max(1, D // 64), mlp_ratio=hidden / D,
                qkv_bias="blocks.0.attn.qkv.bias" in sd)


# ---------------------------------------------------------------------- does a state dict fit a model?
def misfit(own: dict, got: dict, ignore_missing: tuple[str, ...] = ()) -> tuple[list, list, list]:
    """(missing, unexpected, shape mismatches) of `got` against `own` (names -> tensors or shapes); names
    starting with one of `ignore_missing` may be absent (fixed tables, a frozen teacher rebuilt anyway)."""
    missing = sorted(k for k in set(own) - set(got) if not k.startswith(ignore_missing))
    unexpected = sorted(set(got) - set(own))
    wrong = [f"{k}: file {_shape(got[k])} vs model {_shape(own[k])}"
             for k in sorted(set(own) & set(got)) if _shape(own[k]) != _shape(got[k])]
    return missing, unexpected, wrong


def misfit_text(missing, unexpected, wrong, limit: int = 10) -> str:
    """'missing [...]; unexpected [...]; shape mismatch [...]' for the non-empty ones ('' when it fits)."""
    out = []
    for what, keys in (("missing", list(missing)), ("unexpected", list(unexpected)), ("shape mismatch", wrong)):
        if keys:
            out.append(f"{what} {keys[:limit]}{' ...' if len(keys) > limit else ''}")
    return "; ".join(out)


def check_fit(own: dict, got: dict, source: str, ignore_missing: tuple[str, ...] = ()) -> None:
    """One ValueError naming what is missing, unexpected and mis-shaped when `got` does not fit `own`."""
    text = misfit_text(*misfit(own, got, ignore_missing))
    if text:
        raise ValueError(f"{source} does not fit the model: {text}")


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
    check_fit(own, sd, f"checkpoint {source!r}")
    check_tensors(own, sd, source)
    module.load_state_dict(sd, strict=True)


def unwrap_keys(keys: list[str]) -> list[str]:
    """The state dict's names among a file's flattened keys (`checkpoint_keys`), unwrapped as `read_file`
    unwraps the loaded file: under the first of WRAPPERS present, then without a global DDP `module.`."""
    for w in WRAPPERS:
        inner = [k[len(w) + 1:] for k in keys if k.startswith(w + ".")]
        if inner:
            keys = inner
            break
    if keys and all(k.startswith("module.") for k in keys):
        keys = [k[len("module."):] for k in keys]
    return keys


_DECODER_BLOCK = re.compile(r"decoder_blocks\.(\d+)\.")


def decoder_blocks(keys) -> int:
    """How many MAE decoder blocks a state dict's names hold (0 when none)."""
    return 1 + max((int(m.group(1)) for k in keys if (m := _DECODER_BLOCK.match(k))), default=-1)


def load_mae_decoder(model, path: str, num_blocks: int = -1) -> list[str]:
    """Initialise the MCF decoder from an MAE checkpoint: embed + mask token, the first `num_blocks`
    blocks (-1 = all), and norm + pixel head only when every block is loaded. Returns loaded keys."""
    sd = read_state_dict(path)
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "decoder_embed.weight" not in sd:
        raise ValueError(f"{path!r} has no MAE decoder (no 'decoder_embed.weight'); give an MAE pre-training "
                         "checkpoint such as mae_pretrain_vit_base_full.pth")
    have = decoder_blocks(sd)
    depth = len(model.decoder_blocks)
    n = depth if num_blocks < 0 else num_blocks
    if n > depth or n > have:
        raise ValueError(f"asked to load {n} decoder blocks but the model has {depth} and {path!r} has {have}")
    want = tuple(["decoder_embed.", "mask_token"] + [f"decoder_blocks.{i}." for i in range(n)]
                 + (["decoder_norm.", "decoder_pred."] if n == depth else []))
    own = {k: v for k, v in model.state_dict().items() if k.startswith(want)}
    picked = {k: v for k, v in sd.items() if k.startswith(want)}
    check_fit(own, picked, f"MAE decoder in {path!r}")
    check_tensors(own, picked, path)
    model.load_state_dict(picked, strict=False)
    return sorted(picked)
