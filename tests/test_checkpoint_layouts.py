"""The released checkpoint layouts (reference code, MAE, MoCo v3, timm, ours) load in eval, convert,
teacher and --model.init, giving the same networks as the weights read by hand."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from mcf_fast.model.init_from import init_from_checkpoint
from mcf_fast.model.layouts import load_vit, open_checkpoint
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.teacher import build_teacher_vit
from mcf_fast.model.vit import VisionTransformer

KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=2,
          decoder_num_heads=2, proj_hidden=32, proj_dim=16, teacher="random",
          teacher_arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2), teacher_layers=(0, 1, 3))


def _distinct(model, scale=0.05):
    """Every tensor different from a fresh init and from its twin (online vs target)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * scale)
    return model


def _source():
    torch.manual_seed(11)
    return _distinct(MCFModel(**KW))


def _args():
    """The kind of `args` MAE's and the reference code's save_model store (numpy values included)."""
    return argparse.Namespace(model="mae_vit_base_patch16_dec512d8b", blr=1.5e-4, batch_size=64, accum_iter=8,
                              moco_m=np.float64(0.99), seed=np.int64(0), dtype=np.dtype("float32"),
                              output_dir="./output_dir", norm_pix_loss=False)


def _training_wrap(model_sd, epoch=15):
    return {"model": model_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
            "epoch": epoch, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
            "args": _args()}


def _reference_sd(src: MCFModel, projector_names="fc"):
    """The reference code's model keys (its projectors live inside the encoders as `.fc`)."""
    sd = src.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out["online_encoder." + k[8:]] = v
        elif k.startswith("target_encoder."):
            out[k] = v
        elif k.startswith("projector."):
            out[("online_encoder.fc." if projector_names == "fc" else "projector.") + k[10:]] = v
        elif k.startswith("target_projector."):
            out[("target_encoder.fc." if projector_names == "fc" else "target_projector.") + k[17:]] = v
        elif k.startswith("perceptual.teacher."):
            out["perceptual_loss.model." + k[len("perceptual.teacher."):]] = v
        else:  # predictor.*, decoder_*, mask_token, decoder_pos_embed
            out[k] = v
    out["perceptual_loss.model.head.weight"] = torch.randn(1000 // 100, 32)
    out["perceptual_loss.model.head.bias"] = torch.randn(10)
    return out


def _by_hand(sd: dict, prefix: str, arch: dict) -> VisionTransformer:
    vit = VisionTransformer(**arch)
    vit.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
                         and not k[len(prefix):].startswith(("fc.", "head."))}, strict=True)
    return vit.eval()


def _same_output(a, b):
    x = torch.randn(2, 3, a.arch["img_size"], a.arch["img_size"])
    with torch.no_grad():
        assert torch.equal(a.eval().forward_features(x), b.eval().forward_features(x))


@pytest.fixture
def files(tmp_path):
    src = _source()
    enc_arch = dict(src.encoder.arch)
    ref = _reference_sd(src)
    mae = {**{k[8:]: v for k, v in src.state_dict().items() if k.startswith("encoder.")},
           **{k: v for k, v in src.state_dict().items() if k.startswith(("decoder_", "mask_token"))}}
    enc = {k[8:]: v for k, v in src.state_dict().items() if k.startswith("encoder.")}
    tgt = {k[15:]: v for k, v in src.state_dict().items() if k.startswith("target_encoder.")}
    moco = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in enc.items()},
                           **{f"module.momentum_encoder.{k}": v for k, v in tgt.items()},
                           "module.base_encoder.head.0.weight": torch.randn(8, 64),
                           "module.momentum_encoder.head.0.weight": torch.randn(8, 64),
                           "module.predictor.0.weight": torch.randn(8, 8)},
            "epoch": 300, "arch": "vit_base", "optimizer": {"state": {}, "param_groups": []}}
    paths = {"reference": tmp_path / "checkpoint-15.pth", "reference_proj": tmp_path / "ref_projector_names.pth",
             "reference_ddp": tmp_path / "ref_ddp.pth", "mae": tmp_path / "mae-checkpoint-399.pth",
             "moco": tmp_path / "vit-b-300ep.pth.tar"}
    torch.save(_training_wrap(ref), paths["reference"])
    torch.save(_training_wrap(_reference_sd(src, "projector")), paths["reference_proj"])
    torch.save(_training_wrap({"module." + k: v for k, v in ref.items()}), paths["reference_ddp"])
    torch.save(_training_wrap(mae, epoch=399), paths["mae"])
    torch.save(moco, paths["moco"])
    return src, enc_arch, ref, paths


def test_reference_layout_is_recognised_and_said(files):
    """A reference-code training checkpoint (args Namespace, numpy scalars) loads weights-only and says what it is."""
    src, arch, ref, paths = files
    ck = open_checkpoint(str(paths["reference"]))
    assert ck.layout == "reference-code MCF checkpoint" and ck.meta["epoch"] == 15
    assert set(ck.parts) == {"online_encoder", "target_encoder", "teacher", "decoder", "projector",
                             "target_projector", "predictor"}
    assert ck.unused == [] and set(ck.dropped) == {"perceptual_loss.model.head.weight", "perceptual_loss.model.head.bias"}
    _, text, _ = load_vit(str(paths["reference"]))
    assert text.startswith("reference-code MCF checkpoint, epoch 15: online encoder ViT/8 (64-d x 2 blocks")


@pytest.mark.parametrize("name", ["reference", "reference_proj", "reference_ddp", "mae", "moco"])
def test_online_and_target_round_trip(files, name):
    """Each layout's online (and, where present, target) encoder equals the weights read by hand."""
    src, arch, ref, paths = files
    vit, _, ck = load_vit(str(paths[name]), num_heads=2)
    _same_output(vit, _by_hand(src.state_dict(), "encoder.", arch))
    if name != "mae":
        tgt, text, _ = load_vit(f"{paths[name]}#target_encoder", num_heads=2)
        _same_output(tgt, _by_hand(src.state_dict(), "target_encoder.", arch))
        assert "target encoder" in text
        assert not torch.equal(tgt.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_teacher_from_each_layout(files):
    """--model.teacher checkpoint:FILE takes the reference code's own teacher, else the (base) encoder."""
    src, arch, ref, paths = files
    t = build_teacher_vit(f"checkpoint:{paths['reference']}", {}, seed=0, num_heads=2)
    teacher_arch = dict(KW["teacher_arch"], in_chans=3, mlp_ratio=4.0, qkv_bias=True)
    _same_output(t, _by_hand(src.state_dict(), "perceptual.teacher.", teacher_arch))
    for name in ("moco", "mae"):
        t = build_teacher_vit(f"checkpoint:{paths[name]}", {}, seed=0, num_heads=2)
        _same_output(t, _by_hand(src.state_dict(), "encoder.", arch))
    t = build_teacher_vit(f"checkpoint:{paths['moco']}#target_encoder", {}, seed=0, num_heads=2)
    _same_output(t, _by_hand(src.state_dict(), "target_encoder.", arch))
    from mcf_fast.train.cli import parse_args
    cfg, _ = parse_args(["--model.teacher", f"checkpoint:{paths['reference']}#online_encoder",
                         "--model.teacher_layers", "0,1"])  # the CLI's early checks accept FILE#PART
    assert cfg.model.teacher.endswith("#online_encoder")


def test_eval_encoder_file_reads_arch_off_the_weights(files):
    """`mcf_fast.eval --encoder FILE` needs no encoder.json; --arch supplies the head count only."""
    from mcf_fast.eval.encoders import build_encoder
    src, arch, ref, paths = files
    enc, info = build_encoder(str(paths["reference"]), None, None, seed=0)
    assert enc.arch["num_heads"] == 1  # 64 // 64: not in the weights
    enc, info = build_encoder(str(paths["reference"]), "vit-large", None, seed=0)
    assert enc.arch["num_heads"] == 16 and enc.arch["embed_dim"] == 64  # heads from --arch, the rest from the file
    enc, info = build_encoder(f"{paths['reference']}#target_encoder", None, None, seed=0)
    assert info["source"] == os.path.abspath(paths["reference"]) and "target encoder" in info["description"]


def test_eval_heads_from_encoder_json(files, tmp_path):
    """An encoder.json given as --arch sets the heads, so the encoder equals the one read by hand."""
    from mcf_fast.eval.encoders import build_encoder
    src, arch, ref, paths = files
    (tmp_path / "a.json").write_text(json.dumps(arch))
    enc, _ = build_encoder(str(paths["mae"]), str(tmp_path / "a.json"), None, seed=0)
    _same_output(enc, _by_hand(src.state_dict(), "encoder.", arch))


def test_convert_file_gives_a_timm_loadable_encoder(files, tmp_path):
    """`convert FILE --encoder OUT` writes encoder.safetensors + encoder.json that timm loads strictly."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from mcf_fast.convert import main
    src, arch, ref, paths = files
    assert main([str(paths["reference"]), "--encoder", str(tmp_path / "exp"), "--num-heads", "2"]) == 0
    meta = json.loads((tmp_path / "exp" / "encoder.json").read_text())
    assert meta["layout"] == "reference-code MCF checkpoint" and meta["num_heads"] == 2
    m = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=meta["img_size"],
                          patch_size=meta["patch_size"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                          num_heads=meta["num_heads"])
    m.load_state_dict(load_file(str(tmp_path / "exp" / "encoder.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().forward_features(x),
                                   _by_hand(src.state_dict(), "encoder.", arch).forward_features(x),
                                   rtol=1e-5, atol=1e-5)


def test_convert_file_out_is_an_init_source(files, tmp_path):
    """`convert FILE --out model.safetensors` maps every trainable part to our names; init reads it back."""
    from mcf_fast.convert import convert
    src, arch, ref, paths = files
    res = convert(str(paths["reference"]), out=str(tmp_path / "m.safetensors"))
    assert res["layout"] == "reference-code MCF checkpoint" and res["epoch"] == 15
    ck = open_checkpoint(str(tmp_path / "m.safetensors"))
    assert ck.layout == "mcf_fast model state dict" and "teacher" not in ck.parts
    from mcf_fast.eval.encoders import build_encoder
    convert(str(paths["reference"]), encoder_dir=str(tmp_path), num_heads=2)  # an export beside it
    enc, info = build_encoder(str(tmp_path / "m.safetensors"), None, None, seed=0)
    assert info["description"].startswith("mcf_fast model state dict")
    dst = MCFModel(**KW)
    init_from_checkpoint(dst, str(tmp_path / "m.safetensors"))
    for k, v in src.state_dict().items():
        if not k.startswith("perceptual."):
            assert torch.equal(dst.state_dict()[k], v), k


def test_init_from_reference_maps_every_part(files):
    """--model.init FILE loads online/target encoders, decoder, projectors and predictor; says the mapping."""
    src, arch, ref, paths = files
    dst = MCFModel(**KW)
    teacher_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("perceptual.")}
    lines = init_from_checkpoint(dst, str(paths["reference"]))
    got = dst.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith("perceptual."):
            assert torch.equal(got[k], teacher_before[k]), k  # the teacher comes from --model.teacher only
        else:
            assert torch.equal(got[k], v), k
    text = "\n".join(lines)
    for part in ("online_encoder <- file", "target_encoder <- file", "decoder <- file", "projector <- file",
                 "target_projector <- file", "predictor <- file", "optimizer: fresh", "teacher in the file"):
        assert part in text, part
    _same_output(dst.encoder, _by_hand(src.state_dict(), "encoder.", arch))


def test_init_from_mae_copies_the_target(files):
    """An MAE checkpoint gives encoder and decoder; the target starts as the loaded encoder; heads stay fresh."""
    src, arch, ref, paths = files
    dst = MCFModel(**KW)
    fresh_pred = dst.predictor[0].weight.clone()
    lines = init_from_checkpoint(dst, str(paths["mae"]))
    assert torch.equal(dst.target_encoder.blocks[1].mlp.fc2.weight, src.encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(dst.decoder_blocks[1].attn.qkv.weight, src.decoder_blocks[1].attn.qkv.weight)
    assert torch.equal(dst.predictor[0].weight, fresh_pred)
    assert any("target_encoder <- copy" in line for line in lines)
    assert any(line.startswith("predictor: fresh") for line in lines)


def test_init_misfit_names_keys_and_loads_nothing(files, tmp_path):
    """A file whose decoder or extra keys do not fit is one error naming them; the model is untouched."""
    src, arch, ref, paths = files
    bad = dict(ref)
    bad["decoder_blocks.1.mlp.fc1.weight"] = torch.zeros(5, 5)
    bad["foo.bar"] = torch.zeros(1)
    torch.save(_training_wrap(bad), tmp_path / "bad.pth")
    dst = MCFModel(**KW)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="foo.bar"):
        init_from_checkpoint(dst, str(tmp_path / "bad.pth"))
    bad.pop("foo.bar")
    torch.save(_training_wrap(bad), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"decoder: shape mismatch \['decoder_blocks.1.mlp.fc1.weight"):
        init_from_checkpoint(dst, str(tmp_path / "bad.pth"))
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    with pytest.raises(ValueError, match="online encoder is ViT/8"):
        init_from_checkpoint(MCFModel(**{**KW, "depth": 3}), str(paths["reference"]))


def test_from_config_applies_model_init(files):
    """MCFModel.from_config, the training entry point's builder, runs --model.init (config field `model.init`)."""
    from mcf_fast.train.config import from_preset
    src, arch, ref, paths = files
    m = from_preset("demo").model
    for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
              "decoder_num_heads", "proj_hidden", "proj_dim"):
        setattr(m, k, KW[k])
    m.teacher, m.init = "pixel", str(paths["reference"])
    m.validate()
    model = MCFModel.from_config(m, seed=0)
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)
    m.init = str(paths["reference"]) + ".missing"
    with pytest.raises(ValueError, match="model.init"):
        m.validate()


def test_unknown_layout_lists_what_it_found(tmp_path):
    """A file in no known layout is an error listing its top-level key prefixes."""
    torch.save({"model": {"layer1.0.conv1.weight": torch.zeros(2), "fc.weight": torch.zeros(2)},
                "args": _args()}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"unknown checkpoint layout.*'layer1': 1.*'fc': 1"):
        open_checkpoint(str(tmp_path / "resnet.pth"))


def test_only_the_allow_list_unpickles(tmp_path):
    """Namespace and numpy scalars load; a Namespace carrying a function is refused, naming it."""
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "args": argparse.Namespace(f=os.system)},
               tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="system"):
        open_checkpoint(str(tmp_path / "evil.pth"))
