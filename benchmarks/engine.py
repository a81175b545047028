"""The engine's objects the benchmarks drive, built in one place: a model from a config section, the
config of a preset as the benchmarks run it, and the loader. When the way to build a model changes,
`build_model` is the one line to change."""
from __future__ import annotations


def build_model(model_cfg, seed: int = 0):
    """The MCF model of `model_cfg` (an `MCFModel`), seeded as training seeds it."""
    from mcf_fast.model.mcf import MCFModel
    return MCFModel.from_config(model_cfg, seed=seed)


def preset_config(preset: str):
    """The preset's config with what needs no files: a `checkpoint:` teacher becomes a random one of the
    same size (the paper's ViT-B/16 at 224), in-memory synthetic faces, no loader workers."""
    from mcf_fast.train.config import from_preset
    cfg = from_preset(preset)
    if cfg.model.teacher.startswith("checkpoint:"):
        cfg.model.teacher = "random"
    cfg.data.workers = 0
    cfg.data.path = ""
    return cfg


def loader(cfg, batch: int, device):
    """The pre-training loader of `cfg.data` at `batch`, one rank."""
    from mcf_fast.data import build_pretrain_loader
    return build_pretrain_loader(cfg.data, batch_size=batch, rank=0, world_size=1, seed=0, device=device)


__all__ = ["build_model", "preset_config", "loader"]
