"""Drop-ins for MAE-style code (facebookresearch/mae `models_mae.py` and its descendants).

Written from the semantics, not from MAE's source:
- `random_masking(x, mask_ratio, noise=None) -> (x_masked, mask, ids_restore)`: per-sample uniform
  noise [N, L]; ids_shuffle = argsort(noise) (ascending: small noise is kept); ids_restore its
  inverse; the first int(L * (1 - mask_ratio)) of ids_shuffle are kept, in shuffle order; mask is
  a float tensor in the original patch order, 0 = kept, 1 = removed. For the same noise the three
  outputs are bit-identical to MAE's recipe. Faster where it does not change a bit: the inverse
  permutation is one scatter, not a second argsort (a permutation has no ties, so both agree), the
  mask is a comparison, not a gather, and the rows move through `gather_visible`.
  When noise is None it is drawn with torch.rand on x's device, exactly as MAE does, so a patched
  model consumes the same random numbers and makes the same masks as the original for one seed.
- `unshuffle_decoder_tokens(x, ids_restore, mask_token)`: [N, 1+K, D] (CLS first) -> [N, 1+L, D],
  mask tokens at the removed patches, original order, no position add (MAE adds it afterwards).
- `patch_mae(model)`: swaps both into a MaskedAutoencoderViT-like instance (decoder pos add fused).
"""
from __future__ import annotations

import types

import torch

from .gather_scatter import gather_visible, scatter_to_full


def random_masking(x, mask_ratio, noise=None):
    """MAE's per-sample random masking: (x_masked [N, K, D], mask [N, L] float, ids_restore [N, L])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"random_masking: x must be [N, L, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    N, L, _ = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    elif tuple(noise.shape) != (N, L):
        raise ValueError(f"random_masking: noise must be [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle, torch.arange(L, device=x.device).expand(N, L))
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = gather_visible(x, ids_keep)
    # MAE builds its mask with torch.ones (the default dtype), 0 for the first len_keep shuffled slots
    mask = (ids_restore >= len_keep).to(torch.get_default_dtype())
    return x_masked, mask, ids_restore


def unshuffle_decoder_tokens(x, ids_restore, mask_token):
    """MAE's decoder un-shuffle: append mask tokens, restore patch order, keep CLS first (no pos add)."""
    return scatter_to_full(x, ids_restore, mask_token, None)


_NEEDED = ("random_masking", "forward_decoder", "decoder_embed", "mask_token", "decoder_pos_embed",
           "decoder_blocks", "decoder_norm", "decoder_pred")


def _random_masking_method(self, x, mask_ratio, noise=None):
    return random_masking(x, mask_ratio, noise)


def _forward_decoder_method(self, x, ids_restore):
    x = self.decoder_embed(x)
    # un-shuffle, mask tokens and the decoder position embedding in one pass
    x = scatter_to_full(x, ids_restore, self.mask_token, pos=self.decoder_pos_embed[0])
    for blk in self.decoder_blocks:
        x = blk(x)
    x = self.decoder_norm(x)
    x = self.decoder_pred(x)
    return x[:, 1:, :]


def patch_mae(model, *, decoder=True):
    """Swap the fused masking (and, with decoder=True, the fused decoder un-shuffle) into an MAE model.

    `model` is a MaskedAutoencoderViT-like nn.Module: it must have `random_masking`,
    `forward_decoder`, `decoder_embed`, `mask_token`, `decoder_pos_embed` ([1, 1 + L, Dd]),
    `decoder_blocks`, `decoder_norm` and `decoder_pred`. The methods are replaced on this instance
    only (bound methods, so copy.deepcopy of the model, e.g. for an EMA, stays patched correctly).
    Returns the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_mae: expected an nn.Module (an MAE MaskedAutoencoderViT), got {type(model).__name__}")
    need = _NEEDED if decoder else _NEEDED[:1]
    missing = [n for n in need if not hasattr(model, n)]
    if missing:
        raise TypeError(f"patch_mae: {type(model).__name__} does not look like MAE's MaskedAutoencoderViT: "
                        f"it lacks {', '.join(missing)}. Call random_masking / unshuffle_decoder_tokens "
                        "directly from your own code instead, or pass decoder=False to patch masking only.")
    if not callable(model.random_masking) or (decoder and not callable(model.forward_decoder)):
        raise TypeError("patch_mae: model.random_masking and model.forward_decoder must be methods")
    if decoder:
        pe = model.decoder_pos_embed
        if not (isinstance(pe, torch.Tensor) and pe.dim() == 3 and pe.shape[0] == 1):
            raise TypeError(f"patch_mae: decoder_pos_embed must be [1, 1 + L, Dd], got "
                            f"{tuple(pe.shape) if isinstance(pe, torch.Tensor) else type(pe).__name__}")
    model.random_masking = types.MethodType(_random_masking_method, model)
    if decoder:
        model.forward_decoder = types.MethodType(_forward_decoder_method, model)
    return model
