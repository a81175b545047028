"""Drop-ins for MAE-style code (facebookresearch/mae `models_mae.py` and its descendants).

Written from the semantics, not from MAE's source:
- `random_masking(x, mask_ratio, noise=None) -> (x_masked, mask, ids_restore)`: per-sample uniform
  noise [N, L]; ids_shuffle = argsort(noise) (ascending: small noise is kept); ids_restore its
  inverse; the first int(L * (1 - mask_ratio)) of ids_shuffle are kept, in shuffle order; mask is
  a float tensor in the original patch order, 0 = kept, 1 = removed. For the same noise the three
  outputs are bit-identical to MAE's recipe, mask_ratio = 1.0 included (x_masked is [N, 0, D]).
  Faster where it does not change a bit: the inverse permutation is one scatter, not a second
  argsort (a permutation has no ties, so both agree), the mask is a comparison, not a gather, and
  the rows move through `gather_visible`. When noise is None it is drawn with torch.rand on x's
  device, exactly as MAE does, so a patched model makes the same masks as the original for one seed.
- `unshuffle_decoder_tokens(x, ids_restore, mask_token)`: [N, 1+K, D] (CLS first) -> [N, 1+L, D],
  mask tokens at the removed patches, original order, no position add (MAE adds it afterwards).
- `patch_mae(model)` / `unpatch_mae(model)` / `is_patched(model)`: see `patch_mae`.

How a model is patched: its class is swapped for a subclass made once per (class, parts) by
`_patched_class`, which defines only the replaced methods. Nothing but the class changes on the
instance, so the state dict is untouched, copies made by `copy.copy` and by DataParallel's
`_replicate_for_data_parallel` (which build a new object of `type(model)`) run their own methods,
and FSDP2 / DDP / torch.compile see an ordinary nn.Module subclass. The generated class is not
importable by name, so `__reduce_ex__` pickles the instance as "this original class, patched
with these parts" (`_rebuild_patched`), which `torch.save`/`torch.load` and `pickle` can rebuild.
"""
from __future__ import annotations

import torch

from .gather_scatter import gather_visible, scatter_to_full


def random_masking(x, mask_ratio, noise=None):
    """MAE's per-sample random masking: (x_masked [N, K, D], mask [N, L] float, ids_restore [N, L])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"random_masking: x must be [N, L, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (0.0 <= float(mask_ratio) <= 1.0):
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1], got {mask_ratio}")
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


# ----------------------------------------------------------------------------------------------
# the replacement methods (module-level functions, so the generated classes hold nothing else)
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


_METHODS = {"masking": ("random_masking", _random_masking_method),
            "decoder": ("forward_decoder", _forward_decoder_method)}
_NEEDED = {"masking": ("random_masking",),
           "decoder": ("forward_decoder", "decoder_embed", "mask_token", "decoder_pos_embed",
                       "decoder_blocks", "decoder_norm", "decoder_pred")}
_FLAG = {"masking": "masking=False", "decoder": "decoder=False"}


class MAEPatched:
    """Marker base of every patched class: `isinstance(model, MAEPatched)` means patch_mae ran on it.

    Class attributes of each generated subclass: `_mcf_base` (the original class) and `_mcf_parts`
    (a tuple, subset of ("masking", "decoder")).
    """

    _mcf_base: type = None
    _mcf_parts: tuple = ()

    def __reduce_ex__(self, protocol):
        if type(self).__dict__.get("_mcf_generated") is not True:
            # something derived a class from ours after patching (e.g. FSDP2's fully_shard): keep
            # Python's default, which names that class
            return super().__reduce_ex__(protocol)
        return _rebuild_patched, (self._mcf_base, self._mcf_parts), self.__getstate__()


_CLASSES: dict = {}


def _patched_class(base: type, parts: tuple) -> type:
    """The subclass of `base` with the fused methods for `parts`, made once and cached."""
    key = (base, parts)
    cls = _CLASSES.get(key)
    if cls is None:
        ns = {name: fn for part, (name, fn) in _METHODS.items() if part in parts}
        ns.update(_mcf_base=base, _mcf_parts=parts, _mcf_generated=True, __module__=base.__module__,
                  __qualname__=f"{base.__qualname__}[patched: {'+'.join(parts)}]",
                  __doc__=f"{base.__name__} with mcf_fast.kernels' fused {' and '.join(parts)} (see patch_mae).")
        cls = type(f"{base.__name__}_mcf_patched", (MAEPatched, base), ns)
        _CLASSES[key] = cls
    return cls


def _rebuild_patched(base, parts):
    """Unpickling helper: an empty instance of the patched class; pickle then restores its state."""
    cls = _patched_class(base, tuple(parts))
    return cls.__new__(cls)


def is_patched(model) -> bool:
    """True when `model` was patched by patch_mae (and not unpatched since)."""
    return isinstance(model, MAEPatched)


def _definers(cls, name):
    return [c for c in cls.__mro__ if name in c.__dict__]


def _refusal(model, parts):
    """Why `model` cannot be patched with `parts` (a one-line message), or None."""
    if not isinstance(model, torch.nn.Module):
        return f"expected an nn.Module (an MAE MaskedAutoencoderViT), got {type(model).__name__}"
    name = type(model).__name__
    own = hasattr(type(model), "random_masking") or hasattr(type(model), "forward_decoder")
    if not own and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        return f"{name} is a torch.compile wrapper: patch the model first and compile it after, or pass model._orig_mod"
    if not own and isinstance(getattr(model, "module", None), torch.nn.Module):
        return (f"{name} wraps the model: pass model.module (patch_mae(model.module)), or better, "
                "patch before wrapping")
    if any(c.__name__ == "FSDPModule" for c in type(model).__mro__) and not is_patched(model):
        return f"{name} is already wrapped by FSDP2's fully_shard: patch the model before fully_shard"
    missing = [n for p in parts for n in _NEEDED[p] if not hasattr(model, n)]
    if missing:
        return (f"{name} does not look like MAE's MaskedAutoencoderViT: it lacks {', '.join(missing)}. "
                "Call random_masking / unshuffle_decoder_tokens from your own code instead, or pass "
                "decoder=False to patch the masking only")
    base = type(model)._mcf_base if is_patched(model) else type(model)
    for part in parts:
        meth = _METHODS[part][0]
        if meth in vars(model):
            return (f"{name}.{meth} is replaced on this instance (an attribute, e.g. an earlier monkey-patch): "
                    f"delete it (del model.{meth}) before patch_mae, or pass {_FLAG[part]}")
        owners = _definers(base, meth)
        if not owners or not callable(owners[0].__dict__[meth]):
            return f"{name}.{meth} must be a method"
        if len(owners) > 1:
            return (f"{owners[0].__qualname__}.{meth} overrides {owners[1].__qualname__}.{meth}; patch_mae would "
                    f"silently replace the override. Pass {_FLAG[part]} to keep it (and call "
                    f"mcf_fast.kernels.{'random_masking' if part == 'masking' else 'scatter_to_full'} from it)")
    if "decoder" in parts:
        pe = model.decoder_pos_embed
        if not (isinstance(pe, torch.Tensor) and pe.dim() == 3 and pe.shape[0] == 1):
            return (f"decoder_pos_embed must be [1, 1 + L, Dd], got "
                    f"{tuple(pe.shape) if isinstance(pe, torch.Tensor) else type(pe).__name__}")
    return None


def patch_mae(model, *, masking=True, decoder=True):
    """Swap the fused masking (masking=True) and decoder un-shuffle (decoder=True) into an MAE model.

    `model` is a MaskedAutoencoderViT-like nn.Module (MAE's or a descendant's): it must have
    `random_masking`, and for decoder=True `forward_decoder`, `decoder_embed`, `mask_token`,
    `decoder_pos_embed` ([1, 1 + L, Dd]), `decoder_blocks`, `decoder_norm` and `decoder_pred`.
    A class that overrides one of the two methods of its parent is refused (TypeError naming the
    override): pass masking=False or decoder=False to keep that override. Wrappers (DDP,
    DataParallel, torch.compile) are refused with the attribute to pass instead: patch first, wrap after.

    The instance's class is swapped for a generated subclass (see the module docstring): the
    state dict is unchanged, whole-model torch.save / pickle, copy.copy, copy.deepcopy, DataParallel
    replicas, DDP, FSDP2 and torch.compile keep the patch. Patching again is a no-op (or changes
    the parts); `unpatch_mae` restores the original class. Returns the model.
    """
    parts = tuple(p for p, on in (("masking", masking), ("decoder", decoder)) if on)
    if not parts:
        raise ValueError("patch_mae: masking=False and decoder=False leave nothing to patch; "
                         "use unpatch_mae(model) to restore the original methods")
    why = _refusal(model, parts)
    if why:
        raise TypeError(f"patch_mae: {why}")
    base = type(model)._mcf_base if is_patched(model) else type(model)
    if is_patched(model) and type(model).__dict__.get("_mcf_generated") is not True:
        raise TypeError(f"patch_mae: {type(model).__name__} was derived from a patched class after patching "
                        "(e.g. by fully_shard); patch or unpatch before wrapping")
    model.__class__ = _patched_class(base, parts)
    return model


def unpatch_mae(model):
    """Undo patch_mae: the model gets its original class back (and behaves bit for bit as before).

    A model that is not patched is returned unchanged. Returns the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch_mae: expected an nn.Module, got {type(model).__name__}")
    if not is_patched(model):
        inner = getattr(model, "module", None)
        if is_patched(inner) or is_patched(getattr(model, "_orig_mod", None)):
            raise TypeError(f"unpatch_mae: {type(model).__name__} wraps the patched model: pass "
                            f"model.{'module' if is_patched(inner) else '_orig_mod'}")
        return model
    if type(model).__dict__.get("_mcf_generated") is not True:
        raise TypeError(f"unpatch_mae: {type(model).__name__} was derived from the patched class after "
                        "patching (e.g. by fully_shard); unpatch before wrapping")
    model.__class__ = type(model)._mcf_base
    return model
