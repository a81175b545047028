"""Fixed held-out faces: the same images and masks in every reconstruction snapshot, and the pixel
errors that say whether a reconstruction is better than a flat guess.

The faces are synthetic faces of the run's seed with indices far past any training set
(`HELDOUT_OFFSET + k`), so they are never trained on and never change between snapshots, resumes
or runs of the same seed. Their masks come from a fixed mask seed, one per face.
"""
from __future__ import annotations

import numpy as np
import torch

from mcf_fast.masking import random_masks
from mcf_fast.model.mcf import patchify, unpatchify

HELDOUT_OFFSET = 1 << 30  # synthetic indices >= this are never part of a training set
MASK_SEED = 20231029


def heldout_faces(seed: int, n: int, size: int, mean, std) -> torch.Tensor:
    """[n, 3, size, size] normalised held-out synthetic faces of data set `seed` (no augmentation)."""
    from mcf_fast.data.synthetic import draw_face
    imgs = np.stack([draw_face(seed, HELDOUT_OFFSET + k, size).image for k in range(n)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def heldout_masks(n: int, num_patches: int, mask_ratio: float, device="cpu"):
    """(ids_keep [n, K], ids_restore [n, L], mask [n, L]) fixed for face k whatever the run."""
    m = random_masks(n, num_patches, mask_ratio, views=1, seed=MASK_SEED, step=0,
                     sample_ids=torch.arange(n), device=device)
    return m.ids_keep[0], m.ids_restore[0], m.mask[0]


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """The decoder's image [N, 3, H, W] for the visible patches `ids_keep` (online encoder; no heads,
    so BatchNorm statistics and the EMA are untouched)."""
    latent = model.encode(model.encoder, imgs, ids_keep)
    return unpatchify(model.decode(latent, ids_restore).float(), model.patch_size)


def pixel_errors(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, mean, std) -> dict:
    """Mean squared error on the removed patches, in 0..1 RGB, of the reconstruction and of two flat
    baselines: each image filled with its own mean colour (an oracle: it sees the removed pixels too)
    and with the mean colour of its visible patches (what a guess from the input alone can do).
    `hf_ratio`: high-frequency energy (neighbour differences) of the reconstruction / the original's."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (imgs.float().cpu() * s + m).clamp(0, 1)
    p = (pred.float().cpu() * s + m).clamp(0, 1)
    removed = mask.cpu().bool()
    xp, pp = patchify(x, patch), patchify(p, patch)             # [N, L, p*p*3]
    keep = (~removed).float()[..., None]
    colour = x.mean((2, 3))                                     # [N, 3]
    vis_pix = xp.reshape(*xp.shape[:2], -1, 3)                  # [N, L, p*p, 3]
    vis_colour = (vis_pix * keep[..., None]).sum((1, 2)) / (keep.sum(1) * vis_pix.shape[2]).clamp(min=1)

    def err(guess):  # guess: [N, L, p*p*3]
        e = ((guess - xp) ** 2).mean(-1)
        return float(e[removed].mean())

    flat = (lambda c: c[:, None, None, :].expand(-1, xp.shape[1], patch * patch, 3).reshape(xp.shape))

    def hf(t):
        return float((t[..., 1:, :] - t[..., :-1, :]).pow(2).mean() + (t[..., 1:] - t[..., :-1]).pow(2).mean())
    return {"masked_mse": err(pp), "mean_colour_mse": err(flat(colour)), "visible_colour_mse": err(flat(vis_colour)),
            "hf_ratio": hf(p) / max(hf(x), 1e-12)}


def heldout_snapshot(model, data_cfg, model_cfg, seed: int, device, n: int = 8):
    """(imgs, pred, mask) of the fixed held-out faces, for the reconstruction grid. Not for a sharded
    model: a rank-0-only forward through FSDP modules would wait for the other ranks forever."""
    imgs = heldout_faces(seed, n, model_cfg.img_size, data_cfg.mean, data_cfg.std).to(device)
    L = (model_cfg.img_size // model_cfg.patch_size) ** 2
    ids_keep, ids_restore, mask = heldout_masks(n, L, model_cfg.mask_ratio, device)
    pred = reconstruct(model, imgs, ids_keep, ids_restore)
    return imgs, pred, mask
