"""Image bytes -> uint8 RGB [H, W, 3], with every failure named.

`decode_rgb(data, decoder, min_size)` returns `(array, note)`: `note` is None for a plain 8-bit RGB
image, else what was converted ("gray", "cmyk", "rgba", "palette", "16bit", ...), which the loaders
count. Anything unusable raises `BadSample(reason)` with reason one of: "empty", "not_image",
"corrupt" (truncated or damaged data), "too_small", "too_large" (header dimensions above
`max_pixels`, checked before decoding), "too_many_scans" (decode work above the bound below, also
checked before decoding), "unsupported_mode" (meanings in `reasons.SKIP`). Nothing is ever silent.

Work, not only size: a progressive JPEG is decoded in one pass over the image per scan, so a file
within every byte and pixel limit whose scans repeat 300 times took 71 s. The scans are counted
from the markers (every SOS is `FF DA`, a pair the entropy-coded data cannot contain) and a JPEG
may cost at most what a JPEG_SCAN_WORK-scan image of `max_pixels` costs, and at most MAX_JPEG_SCANS
scans whatever its size.

Decoders (JPEG only; other formats always go through pillow): simplejpeg (libjpeg-turbo, measured the
fastest here, see dev/notes/data-path.md), cv2, torchvision.io.decode_jpeg, pillow.
"""
from __future__ import annotations

import io

import numpy as np

from .reasons import BadSample

__all__ = ["IMAGE_EXTS", "MAX_PIXELS", "MAX_JPEG_SCANS", "JPEG_SCAN_WORK", "BadSample", "available_decoders",
           "decode_rgb", "resolve_decoder"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # what readers take as images
MAX_PIXELS = 89_478_485  # default data.max_pixels: Pillow's MAX_IMAGE_PIXELS (a 9459 x 9459 image)
JPEG_MAGIC = b"\xff\xd8"
# Scans of one JPEG: baseline has 1 (3 non-interleaved), libjpeg's progressive script 10 in colour and
# 6 in gray, mozjpeg's optimised ones about 12; 100 leaves room for any encoder and bounds per-scan setup.
MAX_JPEG_SCANS = 100
# Decode work, in scans x pixels, allowed per image as a multiple of max_pixels: a 12-scan progressive
# JPEG at the pixel limit is the most a real file needs (libjpeg's 10-scan script plus two).
JPEG_SCAN_WORK = 12
_SOS = b"\xff\xda"
# Magic numbers of the formats pillow reads that we accept (tar members may hold anything).
_MAGICS = (b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


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


def _jpeg_header(data: bytes) -> tuple[int, int, str | None] | None:
    """(width, height, colour note 'gray'/'cmyk'/None) from a JPEG's header, or None when unparsable
    (the decode then reports the damage). Header only: nothing is decoded, whatever size it claims."""
    try:
        import simplejpeg
    except ImportError:
        return _pillow_size(data)
    try:
        h, w, cs, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # header-only probe; the decode itself reports damage
        return None
    return w, h, {"Gray": "gray", "CMYK": "cmyk", "YCCK": "cmyk"}.get(cs)


def _pillow_size(data: bytes) -> tuple[int, int, None] | None:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            return (*im.size, None)
    except Exception:  # unreadable header: the decode reports it
        return None


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise BadSample("too_large", f"{w}x{h} = {w * h} pixels > {max_pixels} (data.max_pixels)")


def _check_scans(data: bytes, pixels: int, max_pixels: int) -> None:
    """Refuse a JPEG whose scan count makes its decode too much work (see the module docstring)."""
    scans = data.count(_SOS)
    if scans > MAX_JPEG_SCANS or scans * pixels > JPEG_SCAN_WORK * max_pixels:
        raise BadSample("too_many_scans", f"{scans} scans x {pixels} pixels > {JPEG_SCAN_WORK} x {max_pixels} "
                        f"(data.max_pixels), or more than {MAX_JPEG_SCANS} scans")


def _pillow(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(data))
        _check_pixels(*im.size, max_pixels)  # before load(): a bomb's header is cheap, its pixels are not
        im.load()
    except UnidentifiedImageError as e:
        raise BadSample("not_image", str(e)) from None
    except Image.DecompressionBombError as e:  # above 2 x Pillow's own limit (data.max_pixels set higher)
        raise BadSample("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
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


def decode_rgb(data: bytes | None, decoder: str = "simplejpeg", min_size: int = 1, max_pixels: int = MAX_PIXELS):
    """Decode to (uint8 [H, W, 3] RGB, note); raise BadSample naming the problem. The header's
    dimensions are checked against `max_pixels` before any pixel is decoded (decompression bombs)."""
    if not data:
        raise BadSample("empty", "zero bytes")
    if data[:2] == JPEG_MAGIC:
        head = _jpeg_header(data)  # the same header parse that names gray/CMYK: no extra cost
        note = None
        if head is not None:
            _check_pixels(head[0], head[1], max_pixels)
            note = head[2]
        _check_scans(data, head[0] * head[1] if head is not None else 0, max_pixels)
        try:
            arr = _jpeg(data, decoder) if decoder != "pillow" else None
        except Exception as e:  # the libraries raise ValueError/RuntimeError/OSError for damaged data
            # libjpeg-turbo refuses some legal JPEGs (e.g. arithmetic coding): let pillow decide
            try:
                arr, _ = _pillow(data, max_pixels)
            except BadSample as bad:
                if bad.reason == "too_large":
                    raise
                raise BadSample("corrupt", f"{decoder}: {e}") from None
        if arr is None:
            arr, note = _pillow(data, max_pixels)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
    elif any(data.startswith(m) for m in _MAGICS):
        arr, note = _pillow(data, max_pixels)
    else:
        raise BadSample("not_image", f"unknown magic bytes {bytes(data[:4])!r}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadSample("unsupported_mode", f"decoded shape {arr.shape}")
    if min(arr.shape[:2]) < min_size:
        raise BadSample("too_small", f"{arr.shape[1]}x{arr.shape[0]} < {min_size} px")
    return arr, note
