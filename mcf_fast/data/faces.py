"""Procedural synthetic faces with exact labels: the embedded data set and the downstream test fixture.

`draw_face(seed, index, size)` -> `Face(image, landmarks, bbox, parsing, visible, quality)` depends only
on (seed, index, size). Every pixel is classified in a canonical face frame and the landmarks are
mapped through the same similarity transform, so labels and pixels agree exactly.

Conventions (the eval readers in `mcf_fast.eval` rely on these):
- Coordinates are pixels, x to the right, y down, integer values at pixel centres (pixel (row i,
  column j) is centred on (x=j, y=i)).
- 19 landmarks in AFLW-19 order: 0-2 left brow (outer, centre, inner), 3-5 right brow (inner, centre,
  outer), 6-8 left eye (outer, centre, inner), 9-11 right eye (inner, centre, outer), 12-14 nose
  (left, tip, right), 15-17 mouth (left corner, centre, right corner), 18 chin. "Left" is image-left.
- 11-class parsing map in LaPa order: 0 background, 1 skin, 2 left brow, 3 right brow, 4 left eye,
  5 right eye, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair (left = image-left again).
- bbox = (left, right, top, bottom) of the face ellipse (hair excluded), in pixels.
Variation: roll, scale, shift, yaw (a horizontal squeeze plus a sideways shift of the features), skin
tone, feature shapes, open/closed mouth, hair style/colour, background clutter, lighting, noise and
JPEG quality (`Face.quality`, used by the writers).

Writers and their on-disk formats are in `mcf_fast.data.formats`; the command line that drives them
is `python -m mcf_fast.data.synthetic`. This module draws only (it imports numpy, and cv2 if present).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

AFLW19_NAMES = (
    "left_brow_outer", "left_brow_centre", "left_brow_inner",
    "right_brow_inner", "right_brow_centre", "right_brow_outer",
    "left_eye_outer", "left_eye_centre", "left_eye_inner",
    "right_eye_inner", "right_eye_centre", "right_eye_outer",
    "nose_left", "nose_tip", "nose_right", "mouth_left", "mouth_centre", "mouth_right", "chin")
LAPA_CLASSES = ("background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye",
                "nose", "upper_lip", "inner_mouth", "lower_lip", "hair")
# Landmark index -> parsing classes it must fall in (what the tests check).
LANDMARK_CLASSES = ((2,), (2,), (2,), (3,), (3,), (3,), (4,), (4,), (4,), (5,), (5,), (5,),
                    (6,), (6,), (6,), (7, 8, 9), (7, 8, 9), (7, 8, 9), (1,))
FACE_HALF_H = 1.3  # face ellipse half-height in canonical units (half-width is 1)
LM_INSET = 0.7     # corner landmarks sit this far along a feature's half-width (inside it)

_SKIN = np.array([[255, 224, 196], [234, 192, 150], [198, 144, 105], [141, 85, 54], [88, 54, 36]], np.float32)
_HAIR = np.array([[20, 15, 12], [70, 45, 25], [140, 95, 50], [210, 180, 120], [120, 120, 120], [160, 40, 20]],
                 np.float32)
try:
    import cv2 as _cv2
except ImportError:  # pragma: no cover - optional speed-up only
    _cv2 = None
_SKIN_L, _HAIR_L = _SKIN.tolist(), _HAIR.tolist()
_NOISE = None  # a fixed noise tile, drawn once per process (cheaper than fresh noise per image)


@dataclass
class Face:
    image: np.ndarray      # uint8 [S, S, 3] RGB
    landmarks: np.ndarray  # float32 [19, 2] (x, y)
    bbox: np.ndarray       # float32 [4] (left, right, top, bottom)
    parsing: np.ndarray    # uint8 [S, S], LaPa classes
    visible: np.ndarray    # uint8 [19], 1 = visible (always 1 here: no occluders over features)
    quality: int           # JPEG quality the writers use for this face


def _noise_tile() -> np.ndarray:
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).normal(0, 1, (512, 512)).astype(np.float32)
    return _NOISE


class _Canvas:
    """Canonical coordinates (u, v) of every pixel plus the forward map for landmarks."""

    def __init__(self, size, cx, cy, scale, squeeze, roll):
        self.size, self.cx, self.cy = size, cx, cy
        self.sx, self.sy = scale * squeeze, scale
        self.c, self.s = math.cos(roll), math.sin(roll)
        g = np.arange(size, dtype=np.float32)
        dx, dy = g - cx, g - cy
        # inverse rotation, then inverse anisotropic scale, folded into 1-D vectors: a window's
        # coordinates cost one broadcast add each
        self._ux, self._uy = dx * (self.c / self.sx), dy * (self.s / self.sx)
        self._vx, self._vy = dx * (-self.s / self.sy), dy * (self.c / self.sy)

    def uv(self, ys: slice, xs: slice):
        """Canonical (u, v) of the pixels in the window [ys, xs]."""
        return (self._ux[xs][None, :] + self._uy[ys][:, None], self._vx[xs][None, :] + self._vy[ys][:, None])

    def to_pixels(self, pts):
        pts = np.asarray(pts, np.float32)
        x, y = pts[..., 0] * self.sx, pts[..., 1] * self.sy
        return np.stack([self.cx + self.c * x - self.s * y, self.cy + self.s * x + self.c * y], -1)

    def window(self, u0, u1, v0, v1):
        """Pixel slices covering the canonical box [u0,u1] x [v0,v1] (all 4 corners mapped)."""
        xs, ys = [], []
        for a in (u0, u1):
            for b in (v0, v1):
                x, y = a * self.sx, b * self.sy
                xs.append(self.cx + self.c * x - self.s * y)
                ys.append(self.cy + self.s * x + self.c * y)
        x0, y0 = math.floor(min(xs)) - 1, math.floor(min(ys)) - 1
        x1, y1 = math.ceil(max(xs)) + 2, math.ceil(max(ys)) + 2
        S = self.size
        return slice(max(0, y0), min(S, y1)), slice(max(0, x0), min(S, x1))


def _mix(*keys: int) -> int:
    """SplitMix64 chain over Python ints (a numpy call per key would cost more than the whole draw)."""
    h = 0
    for k in keys:
        h = (h ^ (k & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def face_params(seed: int, index: int) -> dict:
    """The random choices of face `index` (a pure function of seed and index)."""
    # Python's Mersenne Twister seeded by an int is stable across versions and ~20x cheaper to set up
    # than a numpy Generator (which matters at 1000 faces/s)
    rnd = random.Random(_mix(0x5FACE, seed, index))
    r = [rnd.random() for _ in range(48)]
    return dict(
        roll=(r[0] - 0.5) * math.radians(50), scale=0.24 + 0.1 * r[1],
        shift=((r[2] - 0.5) * 0.14, (r[3] - 0.5) * 0.14 + 0.02), yaw=(r[4] - 0.5) * 0.5,
        skin=r[5], hair_color=int(r[6] * len(_HAIR)), hair_style=int(r[7] * 4),
        brow_y=-0.42 + (r[8] - 0.5) * 0.08, brow_hw=0.22 + 0.08 * r[9], brow_hh=0.05 + 0.035 * r[10],
        brow_bend=0.02 + 0.06 * r[11],
        eye_y=-0.16 + (r[12] - 0.5) * 0.06, eye_x=0.36 + 0.08 * r[13], eye_hw=0.17 + 0.06 * r[14],
        eye_hh=0.08 + 0.06 * r[15], iris=r[16],
        nose_len=0.3 + 0.12 * r[17], nose_hw=0.13 + 0.07 * r[18],
        mouth_y=0.66 + (r[19] - 0.5) * 0.1, mouth_hw=0.26 + 0.12 * r[20], lip_u=0.07 + 0.05 * r[21],
        lip_l=0.08 + 0.06 * r[22], mouth_open=(r[23] < 0.5) * (0.04 + 0.12 * r[24]),
        light_angle=r[25] * 2 * math.pi, light_amp=0.1 + 0.35 * r[26], brightness=0.75 + 0.45 * r[27],
        bg=(r[28], r[29], r[30]), clutter=int(r[31] * 6), clutter_r=r[36:48],
        quality=int(55 + 40 * r[33]), noise_amp=2 + 8 * r[34], noise_off=(int(r[35] * 256), int(r[32] * 256)),
        lip_color=r[37], hairline=-0.75 + 0.2 * r[38])


def draw_face(seed: int, index: int, size: int = 128) -> Face:
    """Draw face `index` of the data set `seed` at `size` x `size` pixels, with its labels."""
    p = face_params(seed, index)
    S = size
    cv = _Canvas(S, S / 2 + p["shift"][0] * S, S / 2 + p["shift"][1] * S, p["scale"] * S,
                 1.0 - 0.6 * abs(p["yaw"]), p["roll"])
    dx = 0.45 * p["yaw"]  # features slide towards the turned side
    style = p["hair_style"]  # 0 bald, 1 short, 2 long, 3 fringe
    u, v = cv.uv(slice(None), slice(None))
    u2 = u * u
    face = u2 + (v * (1 / FACE_HALF_H)) ** 2 < 1
    lab = face.view(np.uint8).copy()  # 1 = skin
    if style:
        hair = (u2 * (1 / 1.15**2) + ((v + 0.2) * (1 / 1.42)) ** 2 < 1) & (v < (0.9 if style == 2 else -0.1))
        hl = p["hairline"] + (0.12 if style == 3 else 0.0)
        hair &= ~face | (v < hl + 0.08 * u2)  # the fringe: face above a curved hairline
        np.putmask(lab, hair, 10)  # putmask: ~2x faster than boolean setitem

    # all features share one window: u across both eyes/brows, v from the brows to the chin
    ex, ey, ew, eh = p["eye_x"], p["eye_y"], p["eye_hw"], p["eye_hh"]
    bw, by, bh, bb = p["brow_hw"], p["brow_y"], p["brow_hh"], p["brow_bend"]
    my, mw, g = p["mouth_y"], p["mouth_hw"], p["mouth_open"]
    half = ex + max(ew, bw) + 0.02
    ys, xs = cv.window(dx - half, dx + half, by - bb - bh - 0.05, my + g + p["lip_l"] + 0.05)
    uu, vv = cv.uv(ys, xs)
    uu = uu - dx
    sub = lab[ys, xs]  # a view: writes land in lab
    # nose first (eyes win any overlap): a wedge from the bridge to a rounded base
    ny, nw = 0.02 + p["nose_len"] * 0.75, p["nose_hw"]
    au = np.abs(uu)
    nose = ((vv > -0.05) & (vv < ny) & (au < 0.05 + (vv + 0.05) * (nw / (ny + 0.05)))) | \
        ((uu * (1 / nw)) ** 2 + ((vv - ny) * (1 / 0.08)) ** 2 < 1)
    np.putmask(sub, nose, 6)
    # brows and eyes in one broadcast: lens shapes |v - centre line| < hh * (1 - r^2)
    cu = np.array([-ex, ex, -ex, ex])[:, None, None]
    cvv = np.array([by, by, ey, ey])[:, None, None]
    hw = np.array([bw, bw, ew, ew])[:, None, None]
    hh = np.array([bh, bh, eh, eh])[:, None, None]
    bend = np.array([bb, bb, 0, 0])[:, None, None]
    q = 1 - ((uu - cu) / hw) ** 2
    m = (q > 0) & (np.abs(vv - (cvv - bend * q)) < hh * q)
    for k, c in enumerate((2, 3, 4, 5)):
        np.putmask(sub, m[k], c)
    # mouth: upper lip / inner mouth / lower lip between curves that meet at the corners
    t = np.sqrt(np.maximum(1 - (uu * (1 / mw)) ** 2, 0))
    w = vv - my
    inside = au < mw
    np.putmask(sub, inside & (w < -g * t) & (w > -(g + p["lip_u"]) * t), 7)
    if g > 0:
        np.putmask(sub, inside & (w >= -g * t) & (w <= g * t), 8)
    np.putmask(sub, inside & (w > g * t) & (w < (g + p["lip_l"]) * t), 9)

    k, nh = LM_INSET, 0.6 * nw
    bl = by - bb * (1 - k * k)
    lm = np.array([
        (-ex - k * bw, bl), (-ex, by - bb), (-ex + k * bw, bl), (ex - k * bw, bl), (ex, by - bb), (ex + k * bw, bl),
        (-ex - k * ew, ey), (-ex, ey), (-ex + k * ew, ey), (ex - k * ew, ey), (ex, ey), (ex + k * ew, ey),
        (-nh, ny), (0, ny + 0.03), (nh, ny), (-k * mw, my), (0, my), (k * mw, my), (-dx, FACE_HALF_H - 0.12)],
        np.float32)
    lm[:, 0] += dx  # chin stays on the face outline (its -dx cancels)
    landmarks = cv.to_pixels(lm).astype(np.float32)
    a, b = cv.sx, cv.sy * FACE_HALF_H
    hx, hy = math.hypot(a * cv.c, b * cv.s), math.hypot(a * cv.s, b * cv.c)
    bbox = np.array([cv.cx - hx, cv.cx + hx, cv.cy - hy, cv.cy + hy], np.float32)
    image = _paint(lab, p, cv, S, landmarks[[7, 10]])
    return Face(image, landmarks, bbox, lab, np.ones(19, np.uint8), p["quality"])


_LEVELS = 32          # quantised lighting levels (noise dithers between them)
_GAIN_LO, _GAIN_HI = 0.3, 1.9
_GAINS = _GAIN_LO + np.arange(_LEVELS, dtype=np.float32) * ((_GAIN_HI - _GAIN_LO) / (_LEVELS - 1))
_FIXED = np.array([[235, 235, 230], [70, 20, 25]], np.float32)


def _paint(lab, p, cv, S, eye_centres) -> np.ndarray:
    """Colour the label map. Speed matters (>= 1000 faces/s at 128 px on one core), so colour goes
    through one table look-up: each pixel gets a palette entry (class colour, iris, background,
    clutter) and a quantised lighting level (linear gradient x brightness, dithered by a fixed noise
    tile), and a packed-uint32 table maps (level, entry) to RGB. Labels never depend on colour."""
    skin_pos = p["skin"] * (len(_SKIN) - 1)
    i0 = min(int(skin_pos), len(_SKIN) - 2)
    f = skin_pos - i0
    skin = [a + (b - a) * f for a, b in zip(_SKIN_L[i0], _SKIN_L[i0 + 1])]
    hair = _HAIR_L[p["hair_color"]]
    lc = 0.8 + 0.3 * p["lip_color"]
    lip = [skin[0] * 0.85 * lc, skin[1] * 0.55 * lc, skin[2] * 0.55 * lc]
    nc = p["clutter"]
    cr = p["clutter_r"]
    iris = 60 + 120 * p["iris"]
    pal = [[0, 0, 0], skin, [h * 0.8 for h in hair], [h * 0.8 for h in hair], [235, 235, 230], [235, 235, 230],
           [c * 0.88 for c in skin], lip, [70, 20, 25], [c * 1.08 for c in lip], hair, [iris] * 3,
           [c * 255 for c in p["bg"]]]  # 11 iris, 12 background, 13.. clutter
    pal += [[((cr[2 * k] + cr[2 * k + 1]) * m % 1.0) * 255 for m in (97, 151, 211)] for k in range(nc)]
    pal = np.array(pal, np.float32)
    # background: entry 12 with clutter rectangles, only where no face class is drawn
    bgm = lab == 0
    cls = lab + bgm.view(np.uint8) * np.uint8(12)  # 5x cheaper than np.where here
    for k in range(nc):
        x0, y0 = int(cr[2 * k] * S), int(cr[2 * k + 1] * S)
        w, h = int(((cr[2 * k] * 7.3) % 1) * S * 0.5) + 1, int(((cr[2 * k + 1] * 5.1) % 1) * S * 0.5) + 1
        blk = cls[y0:y0 + h, x0:x0 + w]
        np.putmask(blk, bgm[y0:y0 + h, x0:x0 + w], 13 + k)
    ir = 0.6 * p["eye_hh"] * cv.sy
    for (ex, ey), eye_cls in zip(eye_centres, (4, 5)):
        y0, y1 = max(0, int(ey - ir) - 1), min(S, int(ey + ir) + 2)
        x0, x1 = max(0, int(ex - ir) - 1), min(S, int(ex + ir) + 2)
        if y1 > y0 and x1 > x0:
            yy = (np.arange(y0, y1, dtype=np.float32) - ey) ** 2
            xx = (np.arange(x0, x1, dtype=np.float32) - ex) ** 2
            blk = cls[y0:y1, x0:x1]
            np.putmask(blk, (yy[:, None] + xx[None, :] < ir * ir) & (blk == eye_cls), 11)
    g = np.arange(S, dtype=np.float32) * (1 / S) - 0.5
    scale = (_LEVELS - 1) / (_GAIN_HI - _GAIN_LO)
    amp, b = p["light_amp"], p["brightness"]
    gx = (b * (1 + amp * math.cos(p["light_angle"]) * g) - _GAIN_LO) * scale + 0.5
    gy = (b * amp * math.sin(p["light_angle"]) * scale) * g
    oy, ox = p["noise_off"]
    lvl = gx[None, :] + gy[:, None]
    if S <= 256:
        lvl += _noise_tile()[oy:oy + S, ox:ox + S] * (p["noise_amp"] / 255 * scale)
    np.clip(lvl, 0, _LEVELS - 1, out=lvl)
    idx = lvl.astype(np.uint16)
    idx *= len(pal)
    idx += cls
    rgb = np.minimum(_GAINS[:, None, None] * pal[None], 255).astype(np.uint32)
    table = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
    # np.take is ~4x faster than fancy indexing; little-endian uint32 -> bytes R, G, B, 0
    rgbx = np.take(table.reshape(-1), idx).view(np.uint8).reshape(S, S, 4)
    if _cv2 is not None:  # dropping the 4th byte: cv2 15 us vs numpy's strided copy 280 us at 128 px
        return _cv2.cvtColor(rgbx, _cv2.COLOR_RGBA2RGB)
    return np.ascontiguousarray(rgbx[..., :3])
