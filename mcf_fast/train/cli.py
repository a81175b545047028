"""Command line for `python -m mcf_fast.pretrain`: `--preset`, shortcuts, and `--SECTION.FIELD VALUE`.

Mistakes are one-line errors (exit 2) before anything is built: no abbreviations (`--model.dept`
is not `--model.depth`), a misspelt key gets "did you mean ...?", `--help` shows the defaults of the
preset in use and, for fields that pick a kind, the kinds registered now (teachers, attention
backends, ...), and values, paths and cross-field constraints are checked (`config.validate`,
`checks.check_inputs`). `--config FILE` is checked by the same rules (`config_file.py`).
"""
from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import fields

from .checks import check_inputs
from .config import PRESETS, SECTIONS, Config, from_preset
from .config_file import parse_text, read_config_file

PROG = "python -m mcf_fast.pretrain"
SHORTCUTS = {"out": ("run", "out"), "max_steps": ("optim", "max_steps"), "seed": ("run", "seed"),
             "batch_size": ("optim", "batch_size"), "device": ("run", "device")}


class _Parser(argparse.ArgumentParser):
    """argparse without the usage dump: an error is one line (the usage of ~80 options buries it)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _shown(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else repr(v) if v == "" else str(v)


def _start_config(argv: list[str]) -> tuple[Config, str]:
    """The config the overrides apply to (--config FILE or --preset NAME), read before the full parse so
    that --help can show its values."""
    pre = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv)
    if ns.config:
        try:
            return read_config_file(ns.config), f"the config file {ns.config}"
        except ValueError as e:
            pre.error(str(e))
    return from_preset(ns.preset), f"the '{ns.preset}' preset"


def _choices(f) -> str:
    """' Choices: ...' from the registry a field names, as registered when the parser is built."""
    reg = f.metadata.get("choices")
    return f" Choices: {reg.describe()}." if reg is not None and len(reg) else ""


def build_parser(base: Config | None = None, source: str = "the 'demo' preset") -> argparse.ArgumentParser:
    """The full parser; the defaults shown in --help are `base`'s (the preset or config file in use)."""
    base = base or from_preset("demo")
    p = _Parser(
        prog=PROG, allow_abbrev=False,
        description="MCF pre-training. Without any argument: the demo (an MAE teacher stage, then MCF against "
                    "it, then a summary; see python -m mcf_fast.demo --help). Every field below is "
                    f"--SECTION.FIELD VALUE; defaults shown are those of {source}. Rerunning with the same "
                    "--out resumes.")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="named configuration to start from (default: demo)")
    p.add_argument("--config", default=None, help="a config.json (e.g. a run's) to start from instead of a preset")
    p.add_argument("--out", help=f"run folder (= --run.out; default: {base.run.out})")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps (= --optim.max_steps)")
    p.add_argument("--seed", type=int, help="= --run.seed")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per-rank batch (= --optim.batch_size)")
    p.add_argument("--device", help="= --run.device")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for sec in SECTIONS:
        g = p.add_argument_group(f"{sec} (--{sec}.FIELD)")
        for f in fields(getattr(base, sec)):
            d = getattr(getattr(base, sec), f.name)
            help_ = f"{f.metadata.get('help', '')}{_choices(f)} (default: {_shown(d)})".replace("%", "%%")
            g.add_argument(f"--{sec}.{f.name}", dest=f"{sec}.{f.name}", default=None,
                           metavar=type(d).__name__.upper(), help=help_)
    return p


def _unknown(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """One line for the first unknown argument, with the closest real option when there is one."""
    first = extra[0]
    if not first.startswith("-"):
        parser.error(f"unexpected argument {first!r} (options are --SECTION.FIELD VALUE; see --help)")
    name = first.split("=", 1)[0]
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]}?" if close else " (python -m mcf_fast.pretrain --help lists them all)"
    parser.error(f"unknown option {name}{hint}")


def _apply(cfg: Config, ns: argparse.Namespace, parser) -> None:
    """--SECTION.FIELD values, then the shortcuts, onto `cfg`."""
    img_size_set = False
    for key, text in vars(ns).items():
        if "." not in key or text is None:
            continue
        sec, name = key.split(".", 1)
        sub = getattr(cfg, sec)
        ftype = next(f.type for f in fields(sub) if f.name == name)
        try:
            setattr(sub, name, parse_text(text, getattr(sub, name), str(ftype), key))
        except ValueError as e:
            parser.error(str(e))
        img_size_set |= key == "model.img_size"
    for short, (sec, name) in SHORTCUTS.items():
        v = getattr(ns, short)
        if v is not None:
            setattr(getattr(cfg, sec), name, v)
    if img_size_set and getattr(ns, "data.img_size") is None:
        cfg.data.img_size = cfg.model.img_size  # the data follow the model unless told otherwise


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Resolve preset/config file + overrides into a checked Config (exit 2 with one line on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, source = _start_config(argv)
    parser = build_parser(cfg, source)
    ns, extra = parser.parse_known_args(argv)
    if extra:
        _unknown(parser, extra)
    _apply(cfg, ns, parser)
    try:
        cfg.validate()
        check_inputs(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg, ns
