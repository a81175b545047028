"""Every teacher checkpoint layout loads exactly; anything that does not fit is a clear error."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mcf_fast.model.checkpoints import load_mae_decoder
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.teacher import build_teacher_vit
from mcf_fast.model.vit import VisionTransformer, save_encoder

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)


def _vit():
    torch.manual_seed(7)
    v = VisionTransformer(**ARCH)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make every tensor distinct from a fresh init
    return v


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _layouts(v, tmp):
    sd = v.state_dict()
    head = {"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}
    moco = {"state_dict": {**{f"module.base_encoder.{k}": t for k, t in sd.items()},
                           **{f"module.momentum_encoder.{k}": t + 1 for k, t in sd.items()},
                           "module.base_encoder.head.0.weight": torch.randn(4, 64),
                           "module.predictor.0.weight": torch.randn(4, 4)}, "epoch": 300}
    mae = {"model": {**sd, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64)}}
    out = {}
    for name, obj in (("moco.pth.tar", moco), ("mae.pth", mae), ("timm.pth", {**sd, **head}),
                      ("ddp.pth", {f"module.{k}": t for k, t in sd.items()})):
        torch.save(obj, tmp / name)
        out[name] = tmp / name
    save_file({k: t.contiguous() for k, t in {**sd, **head}.items()}, str(tmp / "timm.safetensors"))
    out["timm.safetensors"] = tmp / "timm.safetensors"
    save_encoder(v, str(tmp / "ours"))
    out["ours"] = tmp / "ours" / "encoder.safetensors"
    return out


def test_all_layouts_load_identically(tmp_path):
    """MoCo v3, MAE, timm (.pth and safetensors), DDP-prefixed and our export give the same teacher."""
    v = _vit()
    for name, path in _layouts(v, tmp_path).items():
        t = build_teacher_vit(f"checkpoint:{path}", {}, seed=0, num_heads=2)
        _same(t, v)
        assert not any(p.requires_grad for p in t.parameters()), name
        assert not t.training


def test_arch_is_read_from_the_weights(tmp_path):
    """Width, depth, patch and image size come from the tensor shapes."""
    v = _vit()
    torch.save(v.state_dict(), tmp_path / "w.pth")
    t = build_teacher_vit(f"checkpoint:{tmp_path / 'w.pth'}", {}, seed=0, num_heads=2)
    assert t.arch == {**v.arch}


def test_missing_file_is_an_error():
    """A wrong path names the path; no silent random teacher (the reference code's failure)."""
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_teacher_vit("checkpoint:/tmp/definitely/nope.pth", {}, seed=0)


def test_mismatched_keys_are_listed(tmp_path):
    """A checkpoint that does not fit names the missing and unexpected keys."""
    sd = _vit().state_dict()
    sd.pop("blocks.1.mlp.fc1.weight")
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        build_teacher_vit(f"checkpoint:{tmp_path / 'bad.pth'}", {}, seed=0, num_heads=2)
    assert "blocks.1.mlp.fc1.weight" in str(e.value) and "blocks.1.extra.weight" in str(e.value)


def test_not_a_vit_is_an_error(tmp_path):
    """A state dict without a ViT backbone says what it expected."""
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        build_teacher_vit(f"checkpoint:{tmp_path / 'resnet.pth'}", {}, seed=0)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    """Files that need code to unpickle are refused (weights_only=True)."""
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        build_teacher_vit(f"checkpoint:{tmp_path / 'evil.pth'}", {}, seed=0)


def test_random_teacher_is_seeded_and_frozen():
    """The 'random' teacher depends on its seed only, and never trains."""
    a = build_teacher_vit("random", ARCH, seed=3)
    b = build_teacher_vit("random", ARCH, seed=3)
    c = build_teacher_vit("random", ARCH, seed=4)
    _same(a, b)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert not any(p.requires_grad for p in a.parameters())


def test_mae_decoder_partial_init(tmp_path):
    """The decoder loads the first k blocks (and embed + mask token) from an MAE checkpoint, the rest stay."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=3,
              decoder_num_heads=2, proj_hidden=16, proj_dim=8, teacher="pixel")
    src = MCFModel(**kw)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    mae = {k: v for k, v in src.state_dict().items() if k.startswith(("decoder", "mask_token"))}
    torch.save({"model": mae}, tmp_path / "mae.pth")
    dst = MCFModel(**kw)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    load_mae_decoder(dst, str(tmp_path / "mae.pth"), num_blocks=2)
    got = dst.state_dict()
    assert torch.equal(got["decoder_blocks.1.mlp.fc1.weight"], mae["decoder_blocks.1.mlp.fc1.weight"])
    assert torch.equal(got["mask_token"], mae["mask_token"])
    assert torch.equal(got["decoder_blocks.2.mlp.fc1.weight"], fresh["decoder_blocks.2.mlp.fc1.weight"])
    assert torch.equal(got["decoder_pred.weight"], fresh["decoder_pred.weight"])  # only with all blocks
    with pytest.raises(ValueError, match="asked to load 4"):
        load_mae_decoder(dst, str(tmp_path / "mae.pth"), num_blocks=4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_teacher_weights_are_refused(tmp_path, dtype):
    """Teacher weights of a non-float dtype are an error naming the tensor, not a silent cast."""
    sd = _vit().state_dict()
    sd["blocks.0.attn.qkv.weight"] = (sd["blocks.0.attn.qkv.weight"] * 100).to(dtype)
    torch.save(sd, tmp_path / "int.pth")
    with pytest.raises(ValueError, match=rf"'blocks.0.attn.qkv.weight' has dtype {dtype}, not a float"):
        build_teacher_vit(f"checkpoint:{tmp_path / 'int.pth'}", {}, seed=0, num_heads=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_weights_are_refused(tmp_path, bad):
    """A teacher with NaN / inf weights is refused at load, naming the tensor and how many values."""
    sd = _vit().state_dict()
    sd["blocks.2.mlp.fc1.weight"][3, :2] = bad
    save_file({k: t.contiguous() for k, t in sd.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"'blocks.2.mlp.fc1.weight' holds 2 non-finite value"):
        build_teacher_vit(f"checkpoint:{tmp_path / 'nan.safetensors'}", {}, seed=0, num_heads=2)


def test_non_finite_mae_decoder_is_refused(tmp_path):
    """--model.decoder_init refuses a decoder with NaN weights the same way (nothing is loaded)."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=2, proj_hidden=16, proj_dim=8, teacher="pixel")
    src = MCFModel(**kw)
    mae = {k: v.clone() for k, v in src.state_dict().items() if k.startswith(("decoder", "mask_token"))}
    mae["decoder_embed.weight"][0, 0] = float("nan")
    torch.save({"model": mae}, tmp_path / "mae.pth")
    dst = MCFModel(**kw)
    before = dst.decoder_embed.weight.clone()
    with pytest.raises(ValueError, match="'decoder_embed.weight' holds 1 non-finite"):
        load_mae_decoder(dst, str(tmp_path / "mae.pth"))
    assert torch.equal(dst.decoder_embed.weight, before)
