"""torch.hub entry points of mcf_fast: an exported MCF encoder in one line.

    import torch
    encoder = torch.hub.load("path/to/mcf_fast", "mcf_encoder", source="local", weights="runs/x/encoder.safetensors")

`weights` is an export's encoder.safetensors (encoder.json beside it) or the folder holding both; the
encoder comes back in eval mode, its architecture read from encoder.json and its weights loaded
strictly. Its MODEL_CARD.md says what it saw and how it scores; encoder.json's norm_mean / norm_std are
the input normalisation it expects (also set as `.norm_mean` / `.norm_std` on the returned module).
"""
dependencies = ["torch", "safetensors", "numpy"]


def mcf_encoder(weights: str, pretrained: bool = True):
    """An mcf_fast encoder export as a VisionTransformer (timm key names; `forward_features` -> [N, 1+L, D]).

    weights: path to encoder.safetensors or its folder. pretrained=False gives the same architecture with
    fresh weights (a from-scratch baseline)."""
    import os

    from mcf_fast.eval.identity import read_encoder_json
    from mcf_fast.model.vit import VisionTransformer, load_encoder
    if not weights:
        raise ValueError("mcf_encoder needs weights=PATH (an export's encoder.safetensors or its folder)")
    meta = read_encoder_json(weights if os.path.isdir(weights) else os.path.join(os.path.dirname(weights) or ".",
                                                                                 "encoder.json"))
    if pretrained:
        model = load_encoder(weights)
    else:
        model = VisionTransformer(**{k: meta[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                                          "num_heads", "mlp_ratio", "qkv_bias")})
    model.norm_mean, model.norm_std = meta.get("norm_mean"), meta.get("norm_std")
    return model.eval()
