"""The model's one seam to the data-movement and loss kernels.

The model calls `gather_visible`, `scatter_to_full` and `info_nce` only through this module. They
come from `mcf_fast.kernels` (Triton on CUDA, fast CPU paths, references on request); the plain
statements below are used only when that package is not importable (a broken install), and are
the same math.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _gather_visible_plain(x, ids_keep, pos=None, cls=None):
    N, K = ids_keep.shape
    L, D = x.shape[1], x.shape[2]
    idx = ids_keep.long()
    out = torch.gather(x, 1, idx[..., None].expand(N, K, D))
    if pos is not None:
        p = pos[1:] if pos.shape[0] == L + 1 else pos
        out = out + p[idx]
    if cls is not None:
        c = cls.reshape(1, 1, D)
        if pos is not None and pos.shape[0] == L + 1:
            c = c + pos[0]
        out = torch.cat([c.expand(N, 1, D).to(out.dtype), out], 1)
    return out


def _scatter_to_full_plain(tokens, ids_restore, mask_token, pos=None):
    N, L = ids_restore.shape
    K, Dd = tokens.shape[1] - 1, tokens.shape[2]
    mt = mask_token.reshape(1, 1, Dd).to(tokens.dtype).expand(N, L - K, Dd)
    x_ = torch.cat([tokens[:, 1:], mt], 1)
    x_ = torch.gather(x_, 1, ids_restore.long()[..., None].expand(N, L, Dd))
    out = torch.cat([tokens[:, :1], x_], 1)
    return out + pos if pos is not None else out


def _info_nce_plain(q, k, temperature, label_offset=0, scale=None):
    logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + label_offset
    loss = F.cross_entropy(logits, labels)
    return loss * (1.0 if scale is None else scale)


try:
    from mcf_fast.kernels import gather_visible, info_nce, scatter_to_full  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    log.warning("mcf_fast.kernels is not importable (%s): using plain PyTorch data movement", e)
    gather_visible, scatter_to_full, info_nce = _gather_visible_plain, _scatter_to_full_plain, _info_nce_plain
