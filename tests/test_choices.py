"""Choice-valued options are declared once, beside the code that implements them: the config validates,
and --help documents, through that declaration."""
import dataclasses

import pytest

from mcf_fast import masking
from mcf_fast.model import attention, heads, mcf, teacher
from mcf_fast.train import cli, step
from mcf_fast.train.config import ModelConfig, OptimConfig, from_preset

DECLARED = {("model", "embed_mode"): mcf.EMBED_MODES, ("model", "patch_embed_bias"): mcf.PATCH_EMBED_BIASES,
            ("model", "head_init"): heads.HEAD_INITS, ("model", "teacher_resize"): teacher.RESIZES,
            ("model", "attention"): attention.ATTENTION, ("model", "teacher"): teacher.TEACHERS,
            ("optim", "ema_update"): mcf.EMA_CADENCES, ("model", "mask_kind"): masking.MASK_KINDS}


def test_config_fields_name_the_declarations():
    """Each choice field's metadata is the registry its implementing module declares (one list, no copy)."""
    found = {}
    for sec, cls in (("model", ModelConfig), ("optim", OptimConfig)):
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata:
                found[(sec, f.name)] = f.metadata["choices"]
    assert found == DECLARED
    assert step.EMA_CADENCES is mcf.EMA_CADENCES


@pytest.mark.parametrize("sec,name", sorted(k for k in DECLARED if k[1] != "teacher"))
def test_misspelt_choice_suggests_the_declared_name(sec, name):
    """A misspelt value is refused naming the option, the closest declared name and all of them."""
    cfg = from_preset("demo")
    reg = DECLARED[(sec, name)]
    first = reg.names()[0]
    setattr(getattr(cfg, sec), name, first[:-1] + "z")
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert msg.startswith(f"--{sec}.{name} ") and reg.choices() in msg


def test_help_shows_each_choice_with_its_summary():
    """--help lists every declared value with the summary written beside its code."""
    text = "".join(cli.build_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for reg in DECLARED.values():
        for entry in reg:
            assert "".join(f"'{entry.name}' ({entry.summary})".split()) in text, entry.name
