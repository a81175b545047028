"""Pictures of a downstream run's predictions."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .transforms import load_rgb

TILE = 160
# One colour per LaPa class (background black), distinct enough to read at a glance.
PALETTE = np.array([[0, 0, 0], [255, 204, 153], [0, 153, 0], [0, 204, 102], [0, 0, 255], [0, 153, 255],
                    [255, 255, 0], [255, 0, 0], [153, 0, 153], [204, 0, 0], [102, 51, 0]], np.uint8)


def colourise(label: np.ndarray) -> Image.Image:
    lab = np.asarray(label)
    return Image.fromarray(PALETTE[np.clip(lab, 0, len(PALETTE) - 1)] * (lab[..., None] < len(PALETTE)))


def _grid(tiles: list[Image.Image], cols: int) -> Image.Image:
    rows = max(1, -(-len(tiles) // cols))
    sheet = Image.new("RGB", (cols * TILE, rows * TILE), (32, 32, 32))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * TILE, (k // cols) * TILE))
    return sheet


def alignment_sheet(items, path: str) -> None:
    """Each test face cropped around its box: ground truth green, prediction red, joined by a line."""
    tiles = []
    for image, box, gt, pred in items:
        img = load_rgb(image)
        l, r, t, b = box
        side = 1.4 * max(r - l, b - t)
        cx, cy = (l + r) / 2, (t + b) / 2
        x0, y0 = cx - side / 2, cy - side / 2
        crop = img.crop((int(x0), int(y0), int(x0 + side), int(y0 + side))).resize((TILE, TILE), Image.BILINEAR)
        s = TILE / int(side)
        d = ImageDraw.Draw(crop)
        for (gx, gy), (px, py) in zip(gt, pred):
            g = ((gx - int(x0)) * s, (gy - int(y0)) * s)
            p = ((px - int(x0)) * s, (py - int(y0)) * s)
            d.line([g, p], fill=(255, 255, 0))
            d.ellipse([g[0] - 2, g[1] - 2, g[0] + 2, g[1] + 2], fill=(0, 255, 0))
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(255, 0, 0))
        tiles.append(crop)
    _grid(tiles, 4).save(path)


def parsing_sheet(items, path: str) -> None:
    """One row per test image: the image, the ground-truth map, the predicted map."""
    tiles = []
    for image, gt, pred in items:
        tiles += [load_rgb(image).resize((TILE, TILE), Image.BILINEAR),
                  colourise(gt).resize((TILE, TILE), Image.NEAREST),
                  colourise(pred).resize((TILE, TILE), Image.NEAREST)]
    _grid(tiles, 3).save(path)
