"""The MCF encoders run on the ViT's own stem: `VisionTransformer.embed_visible` / `forward_visible`
(patch embedding through `PatchEmbed.forward_patches`, positions, CLS), bit for bit what the model
computed inline before, and equal to the full-sequence embedding at the kept positions."""
import pytest
import torch
import torch.nn.functional as F

from mcf_fast.masking import random_masks
from mcf_fast.model.mcf import MCFModel
from mcf_fast.model.vit import PatchEmbed, VisionTransformer, conv_patches, run_blocks


def _case(dtype=torch.float32):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    torch.nn.init.normal_(vit.patch_embed.proj.bias)  # a non-zero bias, so its place in the sum shows
    imgs = torch.randn(5, 3, 32, 32).to(dtype)
    keep = random_masks(5, 16, 0.75, seed=1, sample_ids=torch.arange(5)).ids_keep[0]
    return vit.to(dtype), imgs, keep


def _inline_stem(vit, imgs, ids_keep, mode):
    """The encoder stem as MCFModel.encode wrote it out before the ViT had `embed_visible`."""
    from mcf_fast.model import ops
    pos = vit.pos_embed[0]
    if mode == "gather_pixels":
        patches = ops.gather_visible(conv_patches(imgs, 8), ids_keep)
        w = vit.patch_embed.proj.weight
        x = F.linear(patches, w.reshape(w.shape[0], -1), vit.patch_embed.proj.bias)
        x = x + pos[1:][ids_keep]
        cls = (vit.cls_token + pos[:1]).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], 1)
    return ops.gather_visible(vit.patch_embed(imgs), ids_keep, pos=pos, cls=vit.cls_token)


@pytest.mark.parametrize("mode", ["gather_pixels", "embed_all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_visible_is_the_former_inline_stem_bit_for_bit(mode, dtype):
    """Same ops in the same order: the method's tokens equal the former inline code exactly."""
    vit, imgs, keep = _case(dtype)
    assert torch.equal(vit.embed_visible(imgs, keep, mode), _inline_stem(vit, imgs, keep, mode))
    x, _ = run_blocks(vit.blocks, _inline_stem(vit, imgs, keep, mode))
    assert torch.equal(vit.forward_visible(imgs, keep, mode), vit.norm(x))


@pytest.mark.parametrize("mode", ["gather_pixels", "embed_all"])
def test_embed_visible_equals_the_full_sequence_at_kept_positions(mode):
    """CLS first, then the kept patches in ids_keep order, as embed_full computes them for all patches."""
    vit, imgs, keep = _case()
    full = vit.embed_full(imgs)
    index = torch.cat([torch.zeros(5, 1, dtype=torch.long), keep + 1], 1)
    ref = torch.gather(full, 1, index[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(vit.embed_visible(imgs, keep, mode), ref, rtol=1e-5, atol=1e-5)


def test_mcf_encode_goes_through_the_vits_methods(monkeypatch):
    """MCFModel.encode calls the ViT's forward_visible, whose gather_pixels path embeds through
    PatchEmbed.forward_patches (the online and the target encoder alike)."""
    calls = []
    real = PatchEmbed.forward_patches
    monkeypatch.setattr(PatchEmbed, "forward_patches", lambda self, p: (calls.append(self), real(self, p))[1])
    model = MCFModel(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2, proj_hidden=32, proj_dim=16, teacher="pixel")
    _, imgs, _ = _case()
    m = random_masks(5, 16, 0.75, views=2, seed=2, sample_ids=torch.arange(5))
    model(imgs, m.ids_keep[0], m.ids_restore[0], m.mask[0], m.ids_keep[1])
    assert calls == [model.encoder.patch_embed, model.target_encoder.patch_embed]


def test_unknown_embed_mode_is_refused():
    """A misspelt mode is a ValueError naming both modes."""
    vit, imgs, keep = _case()
    with pytest.raises(ValueError, match="'gather_pixels' or 'embed_all'"):
        vit.embed_visible(imgs, keep, "gather")
