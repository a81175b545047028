"""Fixed images for the reconstruction pictures: the same images and masks in every snapshot, and the
pixel errors that say whether a reconstruction is better than a flat guess.

Synthetic runs (no --data.path) use synthetic faces of the run's seed with indices far past any
training set (`HELDOUT_OFFSET + k`): never trained on, the same in every snapshot, resume and run of
the seed. With --data.path the pictures show the user's own images: `PICTURE_N` of them chosen once
by the seed (unreadable ones passed over), resized as the loader resizes them, and saved as
OUT/images/fixed_set.png (+ fixed_set.json naming them) the first time, so a resumed run shows the same
faces even if the data folder changed. They are part of the training data (the loader does not hold
them out). Masks come from a fixed mask seed, one per image.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from mcf_fast.masking import random_masks
from mcf_fast.model.mcf import patchify

log = logging.getLogger("mcf_fast")

HELDOUT_OFFSET = 1 << 30  # synthetic indices >= this are never part of a training set
MASK_SEED = 20231029
PICK_SALT = 0x5E7  # the picture set's draw is its own stream of the run's seed
PICTURE_N = 8
SET_NAME = "fixed_set"  # OUT/images/fixed_set.png and .json
MAX_SET_BYTES = 64 << 20  # a saved set above this is not ours: pick again instead of reading it


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


def reconstruct(model, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """The decoder's image [N, 3, H, W] for the visible patches `ids_keep` (`MCFModel.reconstruct`)."""
    return model.reconstruct(imgs, ids_keep, ids_restore)


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


def pick_images(source, data_cfg, seed: int, n: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """(uint8 [k, size, size, 3], [{'id', 'key'}] * k): up to `n` images of `source` chosen by `seed`,
    decoded and resized as the loader does (shorter side to `size`, centre crop, no flip); unreadable
    samples are passed over. k < n only when the data holds fewer readable images among the draws."""
    from mcf_fast.data.augment import resize_center
    from mcf_fast.data.decode import decode_rgb, resolve_decoder
    from mcf_fast.data.reasons import BadSample
    total = int(source.num_samples)
    draws = np.random.default_rng([seed, PICK_SALT]).choice(total, size=min(total, 4 * n), replace=False)
    decoder = resolve_decoder(data_cfg.decoder)
    imgs, chosen = [], []
    for i in draws.tolist():
        try:
            payload, key = source.read(i)
            img = payload if isinstance(payload, np.ndarray) else \
                decode_rgb(payload, decoder, data_cfg.min_image_size, data_cfg.max_pixels)[0]
        except BadSample:
            continue
        imgs.append(resize_center(img, size))
        chosen.append({"id": i, "key": str(key)})
        if len(imgs) == n:
            break
    if not imgs:
        raise ValueError(f"none of {len(draws)} images drawn from {data_cfg.path} could be read for the pictures")
    return np.stack(imgs), chosen


def read_set(path: str, size: int, n: int) -> np.ndarray | None:
    """The saved set (uint8 [k, size, size, 3]) from its PNG strip, or None when there is none or it
    does not fit this run (another size, not a strip of squares)."""
    from PIL import Image
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_SET_BYTES:
        return None
    try:
        with Image.open(path) as im:
            w, h = im.size  # header only: nothing decoded before the shape is known
            if im.mode != "RGB" or h != size or w % size or not 1 <= w // size <= n:
                return None
            strip = np.asarray(im)
    except (OSError, ValueError, SyntaxError):  # damaged or not a PNG: pick the set again
        return None
    return strip.reshape(size, w // size, size, 3).transpose(1, 0, 2, 3).copy()


def write_set(path: str, imgs: np.ndarray, chosen: list[dict], data_path: str, seed: int) -> None:
    """The set as one PNG strip (a user can look at it) and a JSON naming each image; atomic renames."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    k, size = imgs.shape[0], imgs.shape[1]
    Image.fromarray(imgs.transpose(1, 0, 2, 3).reshape(size, k * size, 3)).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    js = path[: -len(".png")] + ".json"
    with open(js + ".tmp", "w") as f:
        json.dump({"data_path": data_path, "seed": seed, "img_size": size, "images": chosen}, f, indent=1)
    os.replace(js + ".tmp", js)


def picture_images(out_dir: str, data_cfg, size: int, seed: int, source=None, n: int = PICTURE_N,
                   save: bool = True):
    """[k, 3, size, size] normalised CPU images for the pictures: synthetic held-out faces without
    --data.path; with it, the run's saved set, or a set picked from `source` now (and saved, if `save`:
    rank 0; the other ranks of a job pick the same images). None when there is data but no source to
    pick from (the caller shows its batch instead)."""
    if not data_cfg.path:
        return heldout_faces(seed, n, size, data_cfg.mean, data_cfg.std)
    path = os.path.join(out_dir, "images", SET_NAME + ".png")
    imgs = read_set(path, size, n)
    if imgs is None:
        if source is None:
            return None
        try:
            imgs, chosen = pick_images(source, data_cfg, seed, n, size)
        except ValueError as e:  # mostly unreadable data: the loader copes, the pictures show the batch
            log.warning("pictures: %s; showing the current batch instead", e)
            return None
        if not save:
            return _normalised(imgs, data_cfg)
        write_set(path, imgs, chosen, data_cfg.path, seed)
        log.info("pictures: %d images of %s chosen by seed %d, saved as %s", len(imgs), data_cfg.path, seed, path)
    return _normalised(imgs, data_cfg)


def _normalised(imgs: np.ndarray, data_cfg) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(data_cfg.mean).view(1, 3, 1, 1)) / torch.tensor(data_cfg.std).view(1, 3, 1, 1)


def heldout_snapshot(model, imgs: torch.Tensor, model_cfg, device):
    """(imgs, pred, mask) of fixed images `imgs` [k, 3, S, S] under their fixed masks, for the
    reconstruction grid. A sharded model: every rank calls it, with the same images."""
    imgs = imgs.to(device)
    L = (model_cfg.img_size // model_cfg.patch_size) ** 2
    ids_keep, ids_restore, mask = heldout_masks(imgs.shape[0], L, model_cfg.mask_ratio, device)
    pred = reconstruct(model, imgs, ids_keep, ids_restore)
    return imgs, pred, mask
