"""Image bytes -> uint8 RGB [H, W, 3], with every failure named.

`decode_rgb(data, decoder, min_size)` returns `(array, note)`: `note` is None for a plain 8-bit RGB
image, else what was converted ("gray", "cmyk", "rgba", "palette", "16bit", ...), which the loaders
count. Anything unusable raises `BadSample(reason)` with reason one of: "empty", "not_image",
"corrupt" (truncated or damaged data), "too_small", "unsupported_mode". Nothing is ever silent.

Decoders (JPEG only; other formats always go through pillow): simplejpeg (libjpeg-turbo, measured the
fastest here, see docs/notes/issue-5.md), cv2, torchvision.io.decode_jpeg, pillow.
"""
from __future__ import annotations

import io

import numpy as np

JPEG_MAGIC = b"\xff\xd8"
# Magic numbers of the formats pillow reads that we accept (tar members may hold anything).
_MAGICS = (b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class BadSample(Exception):
    """A sample that cannot be used; `.reason` is a short stable key for the counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def available_decoders() -> list[str]:
    """JPEG decoders importable here, fastest first (order measured, see the module docstring)."""
    out = []
    for name, mod in (("simplejpeg", "simplejpeg"), ("cv2", "cv2"), ("torchvision", "torchvision.io")):
        try:
            __import__(mod)
            out.append(name)
        except ImportError:
            pass
    return out + ["pillow"]


def resolve_decoder(name: str) -> str:
    """'auto' -> the fastest installed decoder; a named one must be installed (else ValueError)."""
    have = available_decoders()
    if name == "auto":
        return have[0]
    if name not in have:
        raise ValueError(f"data.decoder={name!r} is not installed here (have {have}); "
                         f"pip install {name} or use data.decoder=auto")
    return name


def _jpeg(data: bytes, decoder: str) -> np.ndarray:
    if decoder == "simplejpeg":
        import simplejpeg
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    if decoder == "cv2":
        import cv2
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if arr is None:
            raise ValueError("cv2.imdecode returned None")
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if decoder == "torchvision":
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return t.permute(1, 2, 0).numpy()
    raise AssertionError(decoder)


def _jpeg_note(data: bytes) -> str | None:
    """Colour space of a JPEG from its header: 'gray', 'cmyk' or None (YCbCr/RGB)."""
    try:
        import simplejpeg
        cs = simplejpeg.decode_jpeg_header(data)[2]
        return {"Gray": "gray", "CMYK": "cmyk", "YCCK": "cmyk"}.get(cs)
    except Exception:  # header-only probe; the decode itself reports damage
        return None


def _pillow(data: bytes) -> tuple[np.ndarray, str | None]:
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as e:
        raise BadSample("not_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt", str(e)) from None
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        # 16-bit and int images span 0..65535: scale, do not clip (pillow's convert clips).
        a = np.clip(a / 257.0 if a.max() > 255 else a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), "16bit"
    if im.info.get("transparency") is not None or mode in ("RGBA", "LA", "PA"):
        note = "rgba"
    else:
        note = {"L": "gray", "1": "gray", "P": "palette", "CMYK": "cmyk", "YCbCr": None,
                "LAB": "lab", "HSV": "hsv", "RGBX": None}.get(mode, "unsupported_mode")
    if note == "unsupported_mode":
        raise BadSample("unsupported_mode", f"pillow mode {mode}")
    try:
        rgb = im.convert("RGBA").convert("RGB") if note == "rgba" else im.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadSample("unsupported_mode", f"{mode}: {e}") from None
    return np.asarray(rgb), note


def decode_rgb(data: bytes | None, decoder: str = "simplejpeg", min_size: int = 1):
    """Decode to (uint8 [H, W, 3] RGB, note); raise BadSample naming the problem."""
    if not data:
        raise BadSample("empty", "zero bytes")
    if data[:2] == JPEG_MAGIC:
        note = _jpeg_note(data)
        try:
            arr = _jpeg(data, decoder) if decoder != "pillow" else None
        except Exception as e:  # the libraries raise ValueError/RuntimeError/OSError for damaged data
            # libjpeg-turbo refuses some legal JPEGs (e.g. arithmetic coding): let pillow decide
            try:
                arr, _ = _pillow(data)
            except BadSample:
                raise BadSample("corrupt", f"{decoder}: {e}") from None
        if arr is None:
            arr, note = _pillow(data)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
    elif any(data.startswith(m) for m in _MAGICS):
        arr, note = _pillow(data)
    else:
        raise BadSample("not_image", f"unknown magic bytes {bytes(data[:4])!r}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadSample("unsupported_mode", f"decoded shape {arr.shape}")
    if min(arr.shape[:2]) < min_size:
        raise BadSample("too_small", f"{arr.shape[1]}x{arr.shape[0]} < {min_size} px")
    return arr, note
