"""Pictures and the Markdown summary of a downstream run."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .metrics import LAPA_CLASSES
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


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))


def summary_markdown(task: str, metrics: dict, info: dict) -> str:
    """metrics.md: the scores (as fractions and as the paper's x100), then how the run was made."""
    lines = [f"# Downstream {task}", ""]
    if task == "alignment":
        keys = ["nme_diag", "nme_box", "nme_inter_ocular", "auc_box_7", "fr_box_7",
                "nme_diag_frontal", "nme_box_frontal", "nme_inter_ocular_frontal"]
        lines += ["Lower is better for NME and FR, higher for AUC. Paper (MCF, AFLW-19 full): NME_diag x100 = 0.932.", ""]
    else:
        keys = ["f1_mean"] + [f"f1_{n}" for n in LAPA_CLASSES]
        lines += ["Mean F1 over the 10 foreground classes (background excluded). Paper (MCF, LaPa): 93.96.", ""]
    lines += ["| metric | value | x100 |", "| --- | ---: | ---: |"]
    for k in keys:
        if k in metrics:
            v = metrics[k]
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(v * 100 if isinstance(v, float) else v)} |")
    lines += ["", f"Scored on {metrics.get('num_images')} test images "
                  f"({info['eval_split']}), at the original image resolution.", "", "## Run", ""]
    for k in ("encoder", "arch", "protocol", "warp_factor", "img_size", "freeze_backbone", "steps", "batch_size", "lr",
              "backbone_lr_scale", "layer_decay", "schedule", "ema_decay", "head_width", "seed", "train_images",
              "train_seconds", "device"):
        if k in info:
            lines.append(f"- {k}: {info[k]}")
    lines += ["", "![predictions](predictions.png)", ""]
    return "\n".join(lines)
