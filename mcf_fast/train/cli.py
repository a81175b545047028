"""Command line for `python -m mcf_fast.pretrain`: `--preset`, shortcuts, and `--SECTION.FIELD VALUE`."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .config import PRESETS, SECTIONS, Config, from_preset

SHORTCUTS = {"out": ("run", "out"), "max_steps": ("optim", "max_steps"), "seed": ("run", "seed"),
             "batch_size": ("optim", "batch_size"), "device": ("run", "device")}


def _convert(text: str, default, type_name: str, key: str):
    """Parse a command-line string into the field's type; errors name the key and the expected form."""
    try:
        if isinstance(default, bool) or type_name == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if isinstance(default, tuple) or type_name.startswith("tuple"):
            items = [t for t in text.replace(" ", "").split(",") if t]
            elem = type(default[0]) if default else float
            return tuple(elem(t) for t in items)
        if isinstance(default, int) or type_name == "int":
            return int(text)
        if isinstance(default, float) or type_name == "float":
            return float(text)
        return text
    except ValueError as e:
        raise ValueError(f"--{key}: cannot read {text!r} as {type_name} ({e})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mcf_fast.pretrain",
        description="MCF pre-training. Without arguments: the 'demo' preset on synthetic faces (CPU, minutes). "
                    "Every field below is --SECTION.FIELD VALUE; rerunning with the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="named configuration to start from")
    p.add_argument("--config", default=None, help="a config.json (e.g. a run's) to start from instead of a preset")
    p.add_argument("--out", help="run folder (= --run.out)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps (= --optim.max_steps)")
    p.add_argument("--seed", type=int, help="= --run.seed")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per-rank batch (= --optim.batch_size)")
    p.add_argument("--device", help="= --run.device")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    defaults = Config()
    for sec in SECTIONS:
        g = p.add_argument_group(f"{sec} (--{sec}.FIELD)")
        for f in fields(getattr(defaults, sec)):
            d = getattr(getattr(defaults, sec), f.name)
            shown = ",".join(map(str, d)) if isinstance(d, tuple) else d
            g.add_argument(f"--{sec}.{f.name}", dest=f"{sec}.{f.name}", default=None, metavar=type(d).__name__.upper(),
                           help=f"{f.metadata.get('help', '')} [preset default: {shown}]".replace("%", "%%"))
    return p


def config_from_dict(d: dict) -> Config:
    cfg = Config(preset=d.get("preset", "custom"))
    for sec in SECTIONS:
        sub = getattr(cfg, sec)
        known = {f.name for f in fields(sub)}
        for k, v in d.get(sec, {}).items():
            if k not in known:
                raise ValueError(f"config key {sec}.{k} is not a known field (known: {sorted(known)})")
            default = getattr(sub, k)
            setattr(sub, k, tuple(v) if isinstance(default, tuple) else v)
    return cfg


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Resolve preset/config file + overrides into a validated Config (exits with a message on bad input)."""
    parser = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)  # unknown keys: argparse error + usage
    if ns.config:
        with open(ns.config) as fh:
            cfg = config_from_dict(json.load(fh))
    else:
        cfg = from_preset(ns.preset)
    img_size_set = False
    for key, text in vars(ns).items():
        if "." not in key or text is None:
            continue
        sec, name = key.split(".", 1)
        sub = getattr(cfg, sec)
        ftype = next(f.type for f in fields(sub) if f.name == name)
        try:
            setattr(sub, name, _convert(text, getattr(sub, name), str(ftype), key))
        except ValueError as e:
            parser.error(str(e))
        img_size_set |= key == "model.img_size"
    for short, (sec, name) in SHORTCUTS.items():
        v = getattr(ns, short)
        if v is not None:
            setattr(getattr(cfg, sec), name, v)
    if img_size_set and getattr(ns, "data.img_size") is None:
        cfg.data.img_size = cfg.model.img_size  # the data follow the model unless told otherwise
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg, ns
