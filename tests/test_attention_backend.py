"""The attention backend is a constructor argument: each ViT keeps the one it was built with, building
another model changes nothing, and MCF_FAST_ATTENTION is only a default read once."""
import os
import sys

import background
import pytest
import torch

from mcf_fast.model import attention
from mcf_fast.model.attention import ATTENTION
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import VisionTransformer, build_vit
from mcf_fast.train.config import from_preset

ARCH = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)


class CountingAttention:
    """A toy backend: SDPA that counts its calls (a new backend is one class and one registry line)."""
    name, summary, fields = "counting", "SDPA, counted (this test's toy backend)", ("model.attention",)
    calls = 0

    @staticmethod
    def precheck(cfg):
        pass

    @classmethod
    def build(cls):
        def attend(q, k, v):
            cls.calls += 1
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attend


@pytest.fixture
def counting():
    CountingAttention.calls = 0
    with ATTENTION.registered(CountingAttention):
        yield CountingAttention


def test_each_model_keeps_its_backend(counting):
    """Building an SDPA model after a 'counting' one leaves the first on its backend, and the outputs agree."""
    torch.manual_seed(0)
    a = build_vit(ARCH, "counting")
    torch.manual_seed(0)
    b = build_vit(ARCH, "sdpa")
    assert a.attention == "counting" and b.attention == "sdpa"
    assert all(blk.attn.attention == "counting" for blk in a.blocks)
    x = torch.randn(2, 3, 16, 16)
    ya = a(x)
    assert counting.calls == 2  # one per block
    yb = b(x)
    assert counting.calls == 2  # b never called it
    torch.testing.assert_close(ya, yb)


def test_from_config_gives_every_vit_the_configured_backend(counting):
    """--model.attention reaches the encoder, target encoder, decoder blocks and a random teacher."""
    m = from_preset("demo").model
    m.attention, m.depth, m.decoder_depth = "counting", 1, 1
    model = MCFModel.from_config(m, seed=0)
    layers = [mod for mod in model.modules() if hasattr(mod, "_attend")]
    assert layers and all(layer.attention == "counting" for layer in layers)
    assert len(layers) == 1 + 1 + 1 + m.teacher_depth  # encoder, target, decoder, teacher blocks
    other = MCFModel.from_config(from_preset("demo").model, seed=0)
    assert all(layer.attention == "sdpa" for layer in other.modules() if hasattr(layer, "_attend"))
    assert all(layer.attention == "counting" for layer in layers)


def test_unknown_backend_is_one_line_with_choices():
    """An unknown backend names the option, suggests the closest name and lists the choices."""
    with pytest.raises(ValueError, match=r"--model.attention 'spda'.*did you mean 'sdpa'.*sdpa, xformers"):
        VisionTransformer(**ARCH, attention="spda")


@pytest.mark.skipif(attention.importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_is_refused_before_any_build(capsys):
    """Asking for xformers where it is not installed is refused by its precheck, naming the fix."""
    from mcf_fast.train import cli
    with pytest.raises(SystemExit):
        cli.parse_args(["--model.attention", "xformers", "--out", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert "xformers is not installed" in err and "--model.attention sdpa" in err


ENV_DEFAULT = ("import os, torch.nn.functional as F\n"
               "from mcf_fast.model.attention import ATTENTION\n"
               "from mcf_fast.model.vit import VisionTransformer\n"
               "class Toy:\n    name, summary = 'toy', 'toy'\n"
               "    build = staticmethod(lambda: F.scaled_dot_product_attention)\n"
               "ATTENTION.register(Toy)\n"
               "a = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)\n"
               "os.environ['MCF_FAST_ATTENTION'] = 'sdpa'\n"
               "b = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)\n"
               "from mcf_fast.train.config import ModelConfig\n"
               "print(a.attention, b.attention, a.blocks[0].attn.attention, ModelConfig().attention)\n")


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the fresh interpreter that reads
    MCF_FAST_ATTENTION is queued in the background (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_environment_default_is_read_once" for i in items):
        env = {**os.environ, "MCF_FAST_ATTENTION": "toy", "OMP_NUM_THREADS": "1"}
        background.start("attention_env", background.run, [sys.executable, "-c", ENV_DEFAULT], 600, env,
                         cost=2)


@pytest.mark.late
def test_environment_default_is_read_once():
    """MCF_FAST_ATTENTION sets the default at import; changing it later changes no model built afterwards
    (a fresh interpreter, started in the background with the session)."""
    start_background(None)  # (already started by conftest)
    r = background.result("attention_env")
    assert r.stdout.split() == ["toy", "toy", "toy", "toy"], r.stderr[-2000:]
