"""What an encoder argument names: its files, its encoder.json, and a digest of its content.

A finished evaluation is keyed by the encoder's content, not its path: `python -m mcf_fast.pretrain`
rerun into the same folder writes new weights at the same path, and the scores of the old ones must not
be reported for them. The digest is a SHA-256 over the bytes of every file that defines the encoder
(encoder.safetensors + encoder.json of an export; the checkpoint file of a foreign layout, with its
`#PART`; the architecture file of a `random` baseline).
"""
from __future__ import annotations

import os

from mcf_fast.model.card import files_digest


def export_paths(encoder: str) -> tuple[str, str]:
    """(encoder.safetensors, encoder.json) of an export named by its folder or its weights file."""
    if os.path.isdir(encoder):
        return os.path.join(encoder, "encoder.safetensors"), os.path.join(encoder, "encoder.json")
    return encoder, os.path.join(os.path.dirname(encoder) or ".", "encoder.json")


def read_encoder_json(path: str) -> dict:
    """The one reader of encoder.json in mcf_fast.eval (a file, or the folder holding it): a JSON object,
    read bounded (`headers.read_small_json`), errors naming the file."""
    from mcf_fast.model.headers import read_small_json
    if os.path.isdir(path):
        path = os.path.join(path, "encoder.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"architecture file not found: {path} (encoder.json is written beside "
                                "encoder.safetensors by pre-training)")
    meta = read_small_json(path, "encoder.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}, not an encoder.json object")
    return meta


def encoder_digest(encoder: str, arch: str = "") -> str:
    """SHA-256 (hex) of the encoder's defining bytes; see the module docstring. For an export it equals the
    digest its MODEL_CARD.md records (`mcf_fast.model.card.export_digest`)."""
    if encoder == "random":
        if arch and (os.path.isdir(arch) or os.path.isfile(arch)):
            return files_digest([os.path.join(arch, "encoder.json") if os.path.isdir(arch) else arch], b"random\0")
        return files_digest([], b"random\0" + arch.encode())
    path, _, part = encoder.partition("#")
    weights, js = export_paths(path)
    if os.path.isdir(path) or (weights.endswith(".safetensors") and os.path.isfile(weights) and os.path.isfile(js)):
        return files_digest([weights, js])
    return files_digest([path], b"#" + part.encode() + b"\0")
