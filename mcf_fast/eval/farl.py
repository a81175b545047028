"""FaRL's downstream geometry: which faces go where, and how predictions come back for scoring.

Every constant below cites the FaRL file it comes from (repository FacePerceiver/FaRL, which FaRL's
README also links as microsoft/FaRL; `blueprint` is the training framework FaRL's configs run on, whose
`ml/augmenters/geometry.py` holds the warps).

Frames. FaRL works in pixel-centre coordinates (integer = pixel centre, the box edge of pixel 0 at
-0.5). Our warps use the continuous frame (pixel i covers [i, i+1)), so a dataset point enters with
+0.5 (`transforms.CENTRE`) and every matrix here maps dataset points -> continuous input pixels.
FaRL warps to 512 x 512 and its backbone resizes that to 448 (`farl/network/transformers.py`,
`FaRLVisualFeatures.forward`, bilinear, align_corners=False: a pure scale in the continuous frame),
so we warp straight to the network's input size S with the 512-frame geometry scaled by S / 512: one
resampling instead of two, the same face placement.

The tanh warp normalises coordinates to [-1, 1]. blueprint (`ml/augmenters/geometry.py`,
`_tanh_warp_transform` / `_inverted_tanh_warp_transform`) divides pixel-centre coordinates by the width,
u = x / 512 * 2 - 1, which is not symmetric about the image centre by half a pixel; facer and our
`centre` frame use the continuous frame, u = (x + 0.5) / 512 * 2 - 1. `WARP_FRAMES` names the two; the
`shift` argument below (`frame_shift`) is that half 512-pixel in input pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

WARP_SIZE = 512      # farl/experiments/*/augmenters/*.yaml: warped_shape [512, 512]
INPUT_SIZE = 448     # farl/experiments/*/train_*_448_refinebb.yaml: input_resolution 448
# farl/datasets/prepare.py, freeze_lapa: landmarks[[104, 105, 54, 84, 90]] -> GetFaceAlignMatrix((512, 512))
LAPA_ALIGN_POINTS = (104, 105, 54, 84, 90)   # eye centres (image-left, image-right), nose tip, mouth corners
# blueprint ml/augmenters geometry `_standard_face_pts` (also facer/transform.py): five points in a 512 frame,
# divided by 256 and shifted by -1 into [-1, 1], then placed with (p + 1) * (w - 1) / 2 (pixel-centre frame).
_STD_FACE_512 = np.array([[196.0, 226.0], [316.0, 226.0], [256.0, 286.0], [220.0, 360.4], [292.0, 360.4]])
LAPA_WARP_FACTOR = 0.8   # farl/experiments/face_parsing/trainers/lapa_farl.yaml: warp_factor default 0.8
AFLW_WARP_FACTOR = 0.0   # farl/experiments/face_alignment/trainers/aflw19_farl.yaml: warp_factor=0.0
WARP_FRAMES = ("blueprint", "centre")


def frame_shift(frame: str, size: int) -> float:
    """Input pixels subtracted before the tanh warp's normalisation: blueprint's x / 512 (pixel centres,
    FaRL) is the continuous frame shifted by half a 512-pixel; 0 for the symmetric `centre` frame."""
    if frame not in WARP_FRAMES:
        raise ValueError(f"warp frame must be one of {WARP_FRAMES}, got {frame!r}")
    return 0.5 * size / WARP_SIZE if frame == "blueprint" else 0.0


def template_points(size: int) -> np.ndarray:
    """FaRL's five-point face template for a size x size input, in the continuous frame."""
    centre_512 = (_STD_FACE_512 / 256.0 - 1.0 + 1.0) * (WARP_SIZE - 1) / 2.0  # pixel-centre frame of 512
    return (centre_512 + 0.5) * (size / WARP_SIZE)


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 least-squares similarity (rotation, uniform scale, shift; no reflection) taking src -> dst.

    The same estimate as skimage's SimilarityTransform.estimate, which FaRL's GetFaceAlignMatrix calls
    (Umeyama 1991 in 2-D: a closed form in the centred point sets)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"similarity fit needs two [K, 2] point sets with K >= 2, got {src.shape}, {dst.shape}")
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    var = (s ** 2).sum()
    if var <= 1e-12:
        raise ValueError("the alignment points coincide; cannot fit a similarity (check the landmark file)")
    a = (s * d).sum() / var                                     # s cos(theta)
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var     # s sin(theta)
    r = np.array([[a, -b], [b, a]])
    t = md - r @ ms
    return np.array([[a, -b, t[0]], [b, a, t[1]], [0.0, 0.0, 1.0]])


def lapa_align_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Dataset points -> continuous input pixels: LaPa's five points fitted to the template."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (106, 2):
        raise ValueError(f"FaRL's LaPa alignment needs the 106 LaPa landmarks, got an array of shape {lm.shape}")
    pts = lm[list(LAPA_ALIGN_POINTS)] + 0.5   # into the continuous frame
    m = similarity_fit(pts, template_points(size))
    return m @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])


def aflw_box_matrix(box: np.ndarray, size: int) -> np.ndarray:
    """Dataset points -> continuous input pixels for AFLW-19 (box = left, right, top, bottom).

    FaRL's UpdateCropAndResizeMatrix((512, 512), align_corners=False) (farl/datasets/prepare.py,
    freeze_aflw19): the box itself, in the landmarks' pixel-centre frame, stretched onto the whole
    input (x1 -> the left edge, x2 -> the right edge); no enlargement, no squaring (scale_mu=1.0 in
    aflw19_farl.yaml)."""
    l, r, t, b = (float(v) for v in box)
    if r <= l or b <= t:
        raise ValueError(f"AFLW-19 box {list(box)} is empty (need left < right and top < bottom)")
    ax, ay = size / (r - l), size / (b - t)
    return np.array([[ax, 0, -l * ax], [0, ay, -t * ay], [0, 0, 1.0]])


# ---------------------------------------------------------------- tanh warp (Lin et al., CVPR 2019)
def _tanh_part(u: np.ndarray | torch.Tensor, f: float, inverse: bool):
    """The 1-D tanh warp of normalised coordinates in [-1, 1]: linear inside |u| <= 1 - f, tanh beyond
    (blueprint `_inverted_tanh_warp_transform` / `_tanh_warp_transform`); inverse = arctanh."""
    lib = torch if isinstance(u, torch.Tensor) else np
    if inverse:
        def g(v):
            return lib.arctanh(lib.clip(v, -0.999, 0.999))
    else:
        g = lib.tanh
    hi, lo = u > 1.0 - f, u < -1.0 + f
    out = lib.where(hi, g((u - 1.0 + f) / f) * f + 1.0 - f, u)
    return lib.where(lo, g((u + 1.0 - f) / f) * f - 1.0 + f, out)


def _warp_axis(p, size: int, warp_factor: float, shift: float, inverse: bool):
    """The tanh warp of input-pixel coordinates along one axis, normalised in the frame `shift` names."""
    u = (p - shift) / size * 2 - 1
    return (_tanh_part(u, warp_factor, inverse=inverse) + 1) / 2 * size + shift


def to_input(pts, m: np.ndarray, size: int, warp_factor: float, shift: float = 0.0):
    """[..., 2] dataset points -> input pixels (continuous): the matrix, then the tanh warp."""
    p = np.asarray(pts, np.float64) @ m[:2, :2].T + m[:2, 2]
    if warp_factor > 0:
        p = _warp_axis(p, size, warp_factor, shift, inverse=False)
    return p


def from_input(pts, m: np.ndarray, size: int, warp_factor: float, shift: float = 0.0):
    """[..., 2] input pixels (continuous) -> dataset points: the exact inverse of `to_input`."""
    p = np.asarray(pts, np.float64)
    if warp_factor > 0:
        p = _warp_axis(p, size, warp_factor, shift, inverse=True)
    inv = np.linalg.inv(m)
    return p @ inv[:2, :2].T + inv[:2, 2]


def _pixel_centres(h: int, w: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    return np.stack([xs, ys], -1)


def _sample(src: torch.Tensor, where: np.ndarray, mode: str, fill: float) -> torch.Tensor:
    """src [C, H, W] sampled at continuous (x, y) positions `where` [h, w, 2]; outside -> fill."""
    c, hs, ws = src.shape
    grid = torch.from_numpy(where / np.array([ws, hs]) * 2 - 1).to(torch.float32)[None]
    x = src[None].float()
    if fill:
        x = x - fill  # grid_sample pads with zeros; shift so the padding reads as `fill`
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    return out + fill if fill else out


def input_grid(m: np.ndarray, size: int, warp_factor: float, shift: float = 0.0) -> np.ndarray:
    """[size, size, 2] continuous source positions of the input's pixel centres: `from_input` on the grid.

    The tanh warp acts on x and y separately, so on the input grid it is undone on two 1-D axes and the
    inverse matrix is then broadcast (about 20x cheaper at 448 than mapping every pixel)."""
    c = np.arange(size) + 0.5
    if warp_factor > 0:
        c = _warp_axis(c, size, warp_factor, shift, inverse=True)
    inv = np.linalg.inv(m)
    x = inv[0, 0] * c[None, :] + inv[0, 1] * c[:, None] + inv[0, 2]
    y = inv[1, 0] * c[None, :] + inv[1, 1] * c[:, None] + inv[1, 2]
    return np.stack([x, y], -1) + 0.5  # dataset (pixel-centre) frame -> continuous frame


def warp_to_input(src: torch.Tensor, m: np.ndarray, size: int, warp_factor: float, mode: str = "bilinear",
                  fill: float = 0.0, grid: np.ndarray | None = None, shift: float = 0.0) -> torch.Tensor:
    """[C, H, W] image (or label map) in the dataset frame -> [C, size, size] network input.

    Each input pixel centre is taken back through `from_input` and sampled there (FaRL's GetTransformMap
    + TransformByMap, cv2.remap with a constant border); `grid` = a precomputed `input_grid`."""
    return _sample(src, input_grid(m, size, warp_factor, shift) if grid is None else grid, mode, fill)


def warp_to_original(maps: torch.Tensor, m: np.ndarray, size: int, warp_factor: float, hw: tuple[int, int],
                     mode: str = "bilinear", shift: float = 0.0) -> torch.Tensor:
    """[C, size, size] maps on the input grid (e.g. logits) -> [C, H, W] on the original image grid.

    Each original pixel centre goes forward through `to_input` and the maps are sampled there (FaRL's
    GetInvertedTransformMap + TransformByMap on the logits, then ArgMax: lapa/test_post.yaml)."""
    h, w = hw
    centres = _pixel_centres(h, w) - 0.5     # continuous pixel centres -> dataset (pixel-centre) frame
    return _sample(maps, to_input(centres, m, size, warp_factor, shift), mode, 0.0)


# ---------------------------------------------------------------- random geometry of training crops
def farl_jitter(rng: np.random.Generator, size: int, task: str) -> np.ndarray:
    """A random similarity about the input centre, as FaRL's UpdateRandomTransformMatrix draws it.

    alignment (face_alignment/trainers/aflw19_farl.yaml + augmenters/train.yaml): shift U(+-0.05) x size,
    rotation U(+-0.174 rad), scale U(1 +- 0.1). parsing (face_parsing/augmenters/lapa/train.yaml): shift
    U(+-0.01) x size, rotation N(0, 0.314 rad), scale N(1, 0.1) (rot/scale normal is blueprint's default)."""
    if task == "alignment":
        dx, dy = rng.uniform(-0.05, 0.05, size=2) * size
        a, z = rng.uniform(-0.174, 0.174), rng.uniform(0.9, 1.1)
    elif task == "parsing":
        dx, dy = rng.uniform(-0.01, 0.01, size=2) * size
        a, z = rng.normal(0.0, 0.314), rng.normal(1.0, 0.1)
    else:
        raise ValueError(f"unknown task {task!r}")
    c, s = z * math.cos(a), z * math.sin(a)
    h = size / 2
    return np.array([[c, -s, h - c * h + s * h + dx], [s, c, h - s * h - c * h + dy], [0, 0, 1.0]])
