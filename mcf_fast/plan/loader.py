"""Loader CPU cores per GPU: this machine's decode + augment rate on one core, at the data's image size.

The measurement runs the torch loader's own per-sample work (`decode_rgb` with the configured JPEG
decoder, then the resize / centre crop / flip / CHW of `augment`, uint8 as the workers hand it to a GPU)
on synthetic faces JPEG-encoded at their drawn quality, single-threaded, for about a second of wall time.
The rate is images per second of this process's CPU time, so other processes loading the machine take
fewer samples from it but do not lower it. Reading the shards is sequential I/O and is not in it.
"""
from __future__ import annotations

import os
import time

SECONDS = 1.0
SAMPLES = 12


def sample_jpegs(size: int, n: int = SAMPLES, seed: int = 0) -> list[bytes]:
    """`n` synthetic face crops of `size` px as the JPEG files `prepare`/`synthetic` would write."""
    from mcf_fast.data.faces import draw_face
    from mcf_fast.data.formats import encode_jpeg
    out = []
    for i in range(n):
        f = draw_face(seed, i, size)
        out.append(encode_jpeg(f.image, f.quality))
    return out


def _one_core():
    """Pin OpenCV to one thread for the measurement; returns the undo."""
    try:
        import cv2
    except ImportError:
        return lambda: None
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    return lambda: cv2.setNumThreads(before)


def measure_rate(data_cfg, source_px: int, seconds: float = SECONDS) -> dict:
    """Images per second per core for decode + augment of `source_px` JPEGs to data_cfg.img_size."""
    from mcf_fast.data import augment
    from mcf_fast.data.decode import decode_rgb, resolve_decoder
    decoder = resolve_decoder(data_cfg.decoder)
    jpegs = sample_jpegs(source_px)
    S = data_cfg.img_size
    undo = _one_core()
    try:
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            for i, data in enumerate(jpegs):
                img, _ = decode_rgb(data, decoder)
                flip = bool(i & 1)
                if augment.fast_square(img, S, flip) is None:
                    augment.to_chw(augment.resize_center(img, S), flip)
            done += len(jpegs)
            if time.perf_counter() - t0 >= seconds:
                break
        cpu = time.process_time() - c0
    finally:
        undo()
    return {"images_per_s_per_core": done / cpu, "decoder": decoder, "source_px": source_px,
            "bytes_per_image": sum(map(len, jpegs)) / len(jpegs), "load_average": os.getloadavg()[0],
            "measured": True}


def given_rate(rate: float, bytes_per_image: float | None) -> dict:
    return {"images_per_s_per_core": rate, "decoder": "given", "source_px": None,
            "bytes_per_image": bytes_per_image, "load_average": None, "measured": False}


def cores_needed(images_per_s: float, rate: dict) -> float:
    return images_per_s / rate["images_per_s_per_core"]


__all__ = ["measure_rate", "given_rate", "cores_needed", "sample_jpegs"]
