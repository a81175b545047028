"""MAE's reconstruction picture: original | masked | reconstruction | reconstruction + visible, one
row per image, under a header that names the columns. Small images are enlarged (nearest neighbour,
whole factors) so the header's words fit above each column."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def recon_grid(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, mean, std,
               max_rows: int = 8) -> np.ndarray:
    """HWC uint8 grid, one row per image: original, masked (removed patches grey), prediction, paste."""
    n = min(max_rows, imgs.shape[0])
    H = imgs.shape[-1]
    g = H // patch
    m = mask[:n].float().cpu().reshape(n, 1, g, 1, g, 1).expand(n, 1, g, patch, g, patch).reshape(n, 1, H, H)
    x, p = imgs[:n].detach().float().cpu(), pred[:n].detach().float().cpu()
    rows = []
    for i in range(n):
        masked = x[i] * (1 - m[i])
        paste = x[i] * (1 - m[i]) + p[i] * m[i]
        tiles = [_to_uint8(t, mean, std) for t in (x[i], masked, p[i], paste)]
        tiles[1][m[i, 0].numpy() > 0] = 127
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
MIN_TILE = 96  # px: narrower columns are enlarged until the longest word fits


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` px wide (a word longer than that keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def header(tile: int, columns=COLUMNS) -> np.ndarray:
    """HWC uint8: black labels on white, one centred (wrapped) label above each `tile`-px-wide column."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=max(10, tile // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, c, font, tile - 6) for c in columns]
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ag")[3]
    line_h, pad = bottom - top + 3, 4
    im = Image.new("RGB", (tile * len(columns), pad * 2 + line_h * max(map(len, wrapped))), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for k, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            x = k * tile + (tile - draw.textlength(line, font=font)) / 2
            draw.text((x, pad + j * line_h - top), line, fill=(0, 0, 0), font=font)
    return np.asarray(im)


def labelled(grid: np.ndarray, tile: int) -> np.ndarray:
    """`grid` (columns of `tile` px) enlarged to columns of at least MIN_TILE px, with the header on top."""
    scale = max(1, math.ceil(MIN_TILE / tile))
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.concatenate([header(tile * scale), grid], axis=0)


def save_grid(grid: np.ndarray, out_dir: str, step: int) -> str:
    """OUT_DIR/recon_stepNNNNNNNN.png and recon_latest.png (atomic renames)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"recon_step{step:08d}.png")  # 8 digits, as checkpoints/step_NNNNNNNN
    Image.fromarray(grid).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    latest = os.path.join(out_dir, "recon_latest.png")
    Image.fromarray(grid).save(latest + ".tmp.png")
    os.replace(latest + ".tmp.png", latest)
    return path


def due(done: int, every: int, total: int) -> bool:
    """A picture every `every` steps (0 = never) and always at the last step."""
    return bool(every and done % every == 0) or done == total


def write_reconstruction(run_dir: str, images, pred, mask, patch: int, mean, std, step: int, logger=None) -> str:
    """The first 8 images of a batch as MAE's picture, columns labelled: a PNG under RUN/images and, with a
    logger, TensorBoard."""
    grid = labelled(recon_grid(images[:8].detach(), pred[:8].detach(), mask[:8], patch, mean, std), images.shape[-1])
    path = save_grid(grid, os.path.join(run_dir, "images"), step)
    if logger is not None:
        logger.image("reconstruction", torch.from_numpy(grid).permute(2, 0, 1), step)
    return path
