"""`--config FILE`: a JSON configuration (a run's config.json, or one written by hand), checked by the
same rules as the command line.

The file is read bounded (a regular file of at most 1 MiB, `model/headers.read_small_json`: a device,
a FIFO or a huge file is refused before it is read). It must be an object whose keys are `preset` and
section names; each section an object whose keys are that section's fields (a misspelt section or key
is refused with the closest real one). Each value has its field's type: strings are read exactly as
the command line reads `--SECTION.FIELD TEXT`; JSON numbers, booleans and lists must match the field
(an int field takes no 3.5, a bool field no 1). The config starts from the preset the file names (a
run's config.json names its own), or from the defaults when it names none or 'custom'; then the
usual `validate()` and pre-flight checks run on the result.
"""
from __future__ import annotations

import difflib
from dataclasses import fields

from mcf_fast.model.headers import read_small_json

from .config import PRESETS, SECTIONS, Config, from_preset

CUSTOM = "custom"  # the preset label of a config that starts from the dataclass defaults


def parse_text(text: str, default, type_name: str, key: str):
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
        raise ValueError(f"--{key}: cannot read {text!r} as {type(default).__name__} ({e})") from None


def _kind(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _scalar(value, like, key: str):
    """A JSON scalar for a field whose default is `like` (bool / int / float / str)."""
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"--{key}: {_kind(value)} {value!r} is not {_kind(like)}")
    return value


def field_value(value, default, type_name: str, key: str):
    """A JSON value for the field `key` (its default and annotation given), by the command line's rules."""
    if isinstance(value, str) and not isinstance(default, str):
        return parse_text(value, default, type_name, key)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ValueError(f"--{key}: {_kind(value)} {value!r} is not a list (or a comma-separated string)")
        like = default[0] if default else 0.0
        return tuple(_scalar(v, like, f"{key}[{i}]") for i, v in enumerate(value))
    return _scalar(value, default, key)


def _unknown(name, known, what: str, prefix: str = "", listed: bool = True) -> str:
    """'section optm is unknown (did you mean optim?); known: ...' for a name not among `known`."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    tail = f"; known: {', '.join(known)}" if listed else " (python -m mcf_fast.pretrain --help lists them)"
    return f"{what} {prefix}{name} is unknown{hint}{tail}"


def config_from_dict(d: dict, where: str = "config") -> Config:
    """A Config from a parsed JSON object; ValueError (one line) for anything the command line would refuse."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be a JSON object of sections ({{\"model\": {{...}}, ...}}), got "
                         f"{_kind(d)}")
    unknown = [k for k in d if k != "preset" and k not in SECTIONS]
    if unknown:
        raise ValueError(f"{where}: {_unknown(unknown[0], ('preset', *SECTIONS), 'section')}")
    preset = d.get("preset", CUSTOM)
    if not isinstance(preset, str) or (preset != CUSTOM and preset not in PRESETS):
        raise ValueError(f"{where}: {_unknown(preset, (*PRESETS, CUSTOM), 'preset')}")
    cfg = from_preset(preset) if preset in PRESETS else Config(preset=CUSTOM)
    for sec in SECTIONS:
        vals = d.get(sec, {})
        if not isinstance(vals, dict):
            raise ValueError(f"{where}: section {sec!r} must be a JSON object of fields, got {_kind(vals)}")
        sub = getattr(cfg, sec)
        types = {f.name: str(f.type) for f in fields(sub)}
        for k, v in vals.items():
            if k not in types:
                raise ValueError(f"{where}: {_unknown(k, types, 'key', f'{sec}.', listed=False)}")
            try:
                setattr(sub, k, field_value(v, getattr(sub, k), types[k], f"{sec}.{k}"))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return cfg


def read_config_file(path: str) -> Config:
    """The Config of a `--config` file, read bounded and checked as above (not yet validated)."""
    return config_from_dict(read_small_json(path, "--config"), f"--config {path}")


__all__ = ["read_config_file", "config_from_dict", "field_value", "parse_text"]
