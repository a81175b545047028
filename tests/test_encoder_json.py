"""encoder.json is checked against the weights' safetensors header (depth, width, patch, heads, input size,
channels, MLP width, qkv bias) before any model is built: a wrong or hostile file costs a header read."""
import json

import pytest
import torch

from mcf_fast.eval.encoders import build_encoder, parse_arch
from mcf_fast.model import vit as vit_mod
from mcf_fast.model.vit import VisionTransformer, load_encoder, save_encoder


@pytest.fixture
def export(tmp_path):
    v = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    st, js = save_encoder(v, str(tmp_path / "enc"))
    return v, st, js


def _edit(js, **change):
    meta = json.load(open(js))
    meta.update(change)
    json.dump(meta, open(js, "w"))


@pytest.fixture
def no_build(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before encoder.json was checked")
    monkeypatch.setattr(vit_mod, "build_vit", refuse)


def test_a_fitting_export_loads(export):
    """The export's own encoder.json passes and the weights load exactly."""
    v, st, _ = export
    enc = load_encoder(st)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), v.state_dict().values()))


@pytest.mark.parametrize("change,needle", [
    ({"depth": 100000}, "depth 100000 in encoder.json, 2 in the weights"),
    ({"embed_dim": 64, "num_heads": 2}, "embed_dim 64 in encoder.json, 32 in the weights"),
    ({"patch_size": 16}, "patch_size 16 in encoder.json, 8 in the weights"),
    ({"img_size": 64}, "img_size 64 in encoder.json, 32 in the weights"),
    ({"in_chans": 1}, "in_chans 1 in encoder.json, 3 in the weights"),
    ({"mlp_ratio": 2.0}, "mlp_ratio 2.0 in encoder.json, MLP width 128 in the weights"),
    ({"qkv_bias": False}, "qkv_bias False in encoder.json, True in the weights"),
    ({"num_heads": 5}, "num_heads 5 does not divide embed_dim 32"),
    ({"depth": -1}, "depth -1 must be a positive integer"),
    ({"depth": "12"}, "depth '12' must be a positive integer"),
    ({"format": "other"}, "is not 'mcf_fast.encoder.v1'"),
])
def test_a_wrong_encoder_json_is_refused_before_any_build(export, change, needle, no_build):
    """Each field that disagrees with the weights (or is no valid value) is named, and no model is built."""
    _, st, js = export
    _edit(js, **change)
    with pytest.raises(ValueError) as e:
        load_encoder(st)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_eval_refuses_it_the_same_way(export, no_build):
    """eval's --encoder (the export) and --arch encoder.json (the scratch baseline) check it the same way."""
    _, st, js = export
    _edit(js, depth=100000)
    with pytest.raises(ValueError, match="depth 100000 in encoder.json, 2 in the weights"):
        build_encoder(st, None, None, 0)
    with pytest.raises(ValueError, match="depth 100000 in encoder.json, 2 in the weights"):
        parse_arch(js)


def test_a_garbled_encoder_json_is_one_line(export):
    """Not JSON, not an object, or missing keys: one line naming the file."""
    _, st, js = export
    open(js, "w").write("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_encoder(st)
    open(js, "w").write("[1]")
    with pytest.raises(ValueError, match="format 'list'"):
        load_encoder(st)
    json.dump({"format": "mcf_fast.encoder.v1", "depth": 2}, open(js, "w"))
    with pytest.raises(ValueError, match="lacks architecture keys"):
        load_encoder(st)
