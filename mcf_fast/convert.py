"""`python -m mcf_fast.convert CKPT [--out FILE] [--encoder DIR]`: a DCP checkpoint to plain files.

CKPT is a checkpoint folder (`RUN/checkpoints/step_NNNNNNNN`), a run's `checkpoints/` folder or the
run folder itself (then the newest complete checkpoint is used). Checkpoints written by any number of
ranks convert the same way, in one process, without a process group: DCP's metadata holds each
tensor's global shape, and loading into full-size tensors re-assembles the shards. CKPT may also be a
single FILE in any layout `mcf_fast.model.layouts` recognises (the reference code's or MAE's training
checkpoint, MoCo v3, timm): `FILE#target_encoder` exports the target encoder instead of the online one.

  --out FILE     the model's state dict (`MCFModel.state_dict()` keys, frozen teacher excluded) as one
                 file: safetensors when FILE ends in .safetensors, else `torch.save` (.pt / .pth).
  --encoder DIR  DIR/encoder.safetensors + DIR/encoder.json (timm names; `mcf_fast.model.vit.load_encoder`
                 reads it back), the same export a finished run writes.

Outputs that are, or lie inside, the checkpoint read or any run's checkpoints/ are refused before any
work (`mcf_fast.outputs`); every refusal is one line: exit 2 for a bad argument or file, 4 for a
damaged or hostile checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

MODEL_PREFIX = "model."


def resolve_checkpoint(path: str) -> str:
    """The complete checkpoint folder that `path` names (a step folder, checkpoints/ or a run folder)."""
    from mcf_fast.train.checkpoint import complete_checkpoints, latest
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder: pass RUN/checkpoints/step_NNNNNNNN, RUN/checkpoints "
                                "or the run folder")
    if os.path.exists(os.path.join(path, ".metadata")):
        if not os.path.exists(os.path.join(path, "COMPLETE")):
            raise ValueError(f"{path} has no COMPLETE marker: it is a half-written checkpoint (a run stopped while "
                             "saving). Use an earlier step folder, or the run folder to pick the newest complete one")
        return path
    for folder in (path, os.path.join(path, "checkpoints")):
        if complete_checkpoints(folder):
            return latest(folder)  # newest intact finite one; damaged newer ones are named in a warning
    raise FileNotFoundError(f"no complete checkpoint under {path} (looked for step_*/COMPLETE in it and in "
                            f"{os.path.join(path, 'checkpoints')})")


def load_model_state(ckpt: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a DCP checkpoint, keys as `MCFModel.state_dict()`, on the CPU."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from mcf_fast.train.checkpoint import CheckpointError, damage
    from mcf_fast.train.dcp_safe import read_metadata_file, safe_load
    why = damage(ckpt)  # digests recorded at save time; .metadata walked, restricted, its values checked
    if why is not None:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({why}): convert an older step folder")
    meta = read_metadata_file(os.path.join(ckpt, ".metadata"))
    # sizes and dtypes were checked against the bytes the files hold (dcp_values, storage_shortfall)
    empty = {k[len(MODEL_PREFIX):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not empty:
        raise ValueError(f"{ckpt} holds no model tensors (keys start with {MODEL_PREFIX!r}): not an mcf_fast checkpoint?")
    state = {"model": empty}
    try:
        with warnings.catch_warnings():  # "loading in a single process" is exactly the intent here
            warnings.simplefilter("ignore", UserWarning)
            safe_load(state, ckpt, no_dist=True)
    except CheckpointException as e:  # DCP wraps each rank's error: surface ours, one line
        inner = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"checkpoint {ckpt} could not be read ({type(inner).__name__}: "
                              f"{(str(inner).strip().splitlines() or [''])[-1][:200]})") from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} could not be read ({(str(e).strip().splitlines() or [''])[-1][:200]})") \
            from None
    return state["model"]


def _run_config(ckpt: str) -> dict | None:
    """The run's config.json (two levels up from a step folder), if present."""
    from mcf_fast.train.checkpoint import CheckpointError
    from mcf_fast.train.ckpt_integrity import read_json_or_why
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.json")
    if not os.path.exists(path):
        return None
    cfg, why = read_json_or_why(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", {}), dict):
        raise CheckpointError(f"{path} is empty or garbled ({why if cfg is None else 'not a config'}): restore it, "
                              "or move it away and pass --num-heads")
    return cfg


def encoder_from_state(sd: dict[str, torch.Tensor], num_heads: int | None, mlp_ratio: float | None = None):
    """A `VisionTransformer` holding the `encoder.*` tensors of a model state dict."""
    from mcf_fast.model.checkpoints import check_fit, infer_vit_arch
    from mcf_fast.model.vit import build_vit
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc:
        raise ValueError("the checkpoint has no encoder.* tensors")
    arch = infer_vit_arch(enc, num_heads)
    if mlp_ratio is not None:
        arch["mlp_ratio"] = mlp_ratio
    vit = build_vit(arch, source="the checkpoint's encoder")
    check_fit(vit.state_dict(), enc, f"the encoder tensors (inferred architecture {arch})")
    vit.load_state_dict(enc)
    return vit


def convert(ckpt: str, out: str | None = None, encoder_dir: str | None = None,
            num_heads: int | None = None) -> dict:
    """Write the requested files; returns {'checkpoint', 'step', 'out'?, 'encoder'?}."""
    if not out and not encoder_dir:
        raise ValueError("nothing to do: pass --out FILE and/or --encoder DIR")
    from mcf_fast.model.foreign_export import write_model_file
    from mcf_fast.model.layouts import split_spec
    from mcf_fast.outputs import check_output
    outs = [p for p in (out, encoder_dir) if p]
    outs += [os.path.join(encoder_dir, n) for n in ("encoder.safetensors", "encoder.json")] if encoder_dir else []
    if os.path.isfile(split_spec(ckpt)[0]):  # a single file: reference-code, MAE, MoCo v3, timm, ours
        from mcf_fast.model.foreign_export import convert_file
        check_output(outs, [split_spec(ckpt)[0]], flag="--out/--encoder")
        return convert_file(ckpt, out, encoder_dir, num_heads)
    if not os.path.exists(split_spec(ckpt)[0]):
        raise FileNotFoundError(f"{ckpt} not found: pass a checkpoint FILE (.pth, .safetensors), "
                                "RUN/checkpoints/step_NNNNNNNN, RUN/checkpoints or the run folder")
    from mcf_fast.train.checkpoint import read_marker
    ckpt = resolve_checkpoint(ckpt)
    check_output(outs, [ckpt], flag="--out/--encoder")  # before anything is read or written
    marker = read_marker(ckpt)
    sd = load_model_state(ckpt)
    result = {"checkpoint": ckpt, "step": marker.get("step"), "world_size": marker.get("world_size")}
    if out:
        write_model_file({k: v.contiguous() for k, v in sd.items()}, out,
                         {"format": "mcf_fast.model.v1", "step": str(marker.get("step"))})
        result["out"] = out
    if encoder_dir:
        from mcf_fast.model.vit import save_encoder
        cfg = _run_config(ckpt) or {}
        mcfg = cfg.get("model", {})
        heads = num_heads or mcfg.get("num_heads")
        if heads is None:
            print("warning: no run config.json beside the checkpoint and no --num-heads: assuming head width 64",
                  file=sys.stderr)
        vit = encoder_from_state(sd, heads, mcfg.get("mlp_ratio"))
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        norm = {k: data[k] for k in ("mean", "std") if k in data}  # the run's normalisation, for eval
        st, _ = save_encoder(vit, encoder_dir, extra={"source": "mcf_fast.convert", "checkpoint": ckpt,
                                                      "steps": marker.get("step"), "preset": cfg.get("preset")},
                             **norm)
        result["encoder"] = st
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcf_fast.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="RUN/checkpoints/step_NNNNNNNN, RUN/checkpoints or RUN; or a FILE "
                                      "(reference-code MCF, MAE, MoCo v3, timm; FILE#target_encoder for the target)")
    p.add_argument("--out", help="single-file model state dict (.safetensors, or torch.save for anything else)")
    p.add_argument("--encoder", help="folder for encoder.safetensors + encoder.json")
    p.add_argument("--num-heads", type=int, default=None,
                   help="encoder heads when the run's config.json is not beside the checkpoint")
    a = p.parse_args(argv)
    from mcf_fast.train.dcp_safe import CheckpointError
    try:
        res = convert(a.checkpoint, a.out, a.encoder, a.num_heads)
    except (ValueError, OSError, CheckpointError) as e:  # one line: 2 = bad argument or file, 4 = bad checkpoint
        print(f"{p.prog}: error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 4 if isinstance(e, CheckpointError) else 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
