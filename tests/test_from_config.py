"""MCFModel.from_config is the one way a ModelConfig becomes a model: every field reaches the constructor by
name (nothing is copied by hand), the init is the same for the same seed, the random teacher comes from
seed + 1, and decoder_init is applied."""
import dataclasses
import inspect

import torch

from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.teacher import build_teacher_vit
from mcf_fast.train.config import ModelConfig, from_preset

# ModelConfig fields that are not constructor keywords, and who reads them.
READ_ELSEWHERE = {"mask_ratio": "train/step.py", "mask_kind": "train/step.py", "decoder_init": "from_config",
                  "decoder_init_blocks": "from_config", "init": "from_config", "compile": "from_config",
                  "teacher_img_size": "teacher_arch", "teacher_patch_size": "teacher_arch",
                  "teacher_embed_dim": "teacher_arch", "teacher_depth": "teacher_arch"}


def test_every_field_has_a_reader():
    """Each ModelConfig field is a keyword of MCFModel or one of the few read elsewhere: a new field cannot be
    silently dropped on its way to the model."""
    keywords = set(inspect.signature(MCFModel.__init__).parameters) - {"self"}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields - keywords == set(READ_ELSEWHERE)


def _small():
    m = from_preset("demo").model
    m.depth, m.decoder_depth, m.teacher_depth, m.teacher_layers = 2, 1, 2, (0, 1)
    m.head_init, m.patch_embed_bias, m.teacher_resize, m.embed_mode = "xavier", "conv_default", "nearest", "embed_all"
    return m


def test_same_model_as_the_constructor_by_hand():
    """from_config(m, seed=s) equals torch.manual_seed(s); MCFModel(<every field by hand>, teacher_seed=s + 1),
    tensor for tensor, and leaves the RNG where that does."""
    m = _small()
    a = MCFModel.from_config(m, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(7)
    b = MCFModel(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                 num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, decoder_embed_dim=m.decoder_embed_dim,
                 decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads, proj_hidden=m.proj_hidden,
                 proj_dim=m.proj_dim, teacher=m.teacher,
                 teacher_arch=dict(img_size=m.teacher_img_size, patch_size=m.teacher_patch_size,
                                   embed_dim=m.teacher_embed_dim, depth=m.teacher_depth,
                                   num_heads=m.teacher_num_heads),
                 teacher_layers=m.teacher_layers, teacher_num_heads=m.teacher_num_heads, teacher_seed=8,
                 norm_pix_loss=m.norm_pix_loss, temperature=m.temperature, perceptual_weight=m.perceptual_weight,
                 contrastive_weight=m.contrastive_weight, embed_mode=m.embed_mode, grad_ckpt=m.grad_ckpt,
                 teacher_grad_ckpt=m.teacher_grad_ckpt, head_init=m.head_init, patch_embed_bias=m.patch_embed_bias,
                 teacher_resize=m.teacher_resize, attention=m.attention)
    assert torch.equal(after_a, torch.rand(3))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a.embed_mode, a.perceptual.resize, a.temperature) == ("embed_all", "nearest", m.temperature)


def test_random_teacher_from_seed_plus_one():
    """The random teacher's weights are the ones its own seed (run seed + 1) gives, whatever the model's init."""
    m = _small()
    model = MCFModel.from_config(m, seed=3)
    arch = dict(img_size=m.teacher_img_size, patch_size=m.teacher_patch_size, embed_dim=m.teacher_embed_dim,
                depth=m.teacher_depth, num_heads=m.teacher_num_heads)
    alone = build_teacher_vit("random", arch, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.perceptual.teacher.state_dict().values(),
                                                 alone.state_dict().values()))


def test_decoder_init_is_applied(tmp_path):
    """A decoder_init file (an MAE checkpoint) initialises the decoder; decoder_init_blocks limits the blocks."""
    m = _small()
    m.decoder_depth = 2
    src = MCFModel.from_config(m, seed=1)
    with torch.no_grad():
        for p in src.decoder_blocks.parameters():
            p.add_(1.0)
    mae = {k: v for k, v in src.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": mae}, tmp_path / "mae.pth")
    m.decoder_init, m.decoder_init_blocks = str(tmp_path / "mae.pth"), 1
    model = MCFModel.from_config(m, seed=2)
    plain = _small()
    plain.decoder_depth = 2
    fresh = MCFModel.from_config(plain, seed=2)
    assert torch.equal(model.decoder_blocks[0].mlp.fc1.weight, src.decoder_blocks[0].mlp.fc1.weight)
    assert torch.equal(model.decoder_blocks[1].mlp.fc1.weight, fresh.decoder_blocks[1].mlp.fc1.weight)


def test_build_messages_reach_train_log(tmp_path):
    """The model is built before the run folder exists, yet what the build says (here: the decoder loaded
    from decoder_init) still lands in OUT/train.log."""
    from test_pretrain_e2e import TINY

    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.loop import train
    argv = ["--out", str(tmp_path / "run"), "--max-steps", "1", *TINY, "--run.tensorboard", "false",
            "--run.progress", "none", "--run.export", "false"]
    cfg, _ = parse_args(argv)
    src = MCFModel.from_config(cfg.model, seed=1)
    mae = {k: v for k, v in src.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": mae}, tmp_path / "mae.pth")
    cfg, _ = parse_args(argv + ["--model.decoder_init", str(tmp_path / "mae.pth")])
    train(cfg)
    text = (tmp_path / "run" / "train.log").read_text()
    assert f"decoder initialised from {tmp_path / 'mae.pth'}" in text
    assert text.index("decoder initialised") < text.index("new run in")
