"""The one vocabulary of data problems: every tool (loader, scan, prepare, DALI index) counts by these names.

`SKIP` maps each reason a sample, file, folder or shard is left out for to a one-line meaning;
`CONVERT` does the same for images that are used after a conversion. docs/data.md ("What is skipped
and counted") shows the same table. `BadSample(reason)` is how a reader or decoder says "leave this one out".
"""
from __future__ import annotations

SKIP = {
    # one image
    "empty": "zero bytes where an image was expected",
    "not_image": "bytes of no image format we read (JPEG, PNG, GIF, BMP, WebP, TIFF)",
    "corrupt": "truncated or damaged image data (the decoder failed)",
    "too_small": "shorter side below data.min_image_size",
    "too_large": "file or tar member above data.max_file_mb, or header dimensions above data.max_pixels",
    "too_many_scans": "a JPEG whose scans x pixels exceed 12 x data.max_pixels (or over 100 scans): too much decode work",
    "unsupported_mode": "a pixel mode we do not convert to RGB",
    "unsafe_pickle": "an LMDB value whose pickle would call code or is out of bounds (only plain data are read)",
    # files and folders
    "unreadable_file": "a file that cannot be opened or read (permissions, broken symlink, vanished)",
    "not_regular_file": "a FIFO, device or socket named like an image (never read: it could block or never end)",
    "unreadable_folder": "a sub-folder that cannot be listed",
    "symlink_loop": "a symlink to a folder above it (a loop): not followed",
    "duplicate_folder": "a folder reached again through another symlink: walked once, where first met",
    # shards and samples inside them
    "missing_image": "a sample (key) with no image member",
    "bad_name": "a member name with whitespace or control characters (DALI's index cannot hold it)",
    "missing_shard": "a shard the pattern names that does not exist",
    "empty_shard": "a shard of zero bytes or without members",
    "corrupt_shard": "a tar unreadable past some point (cut or damaged); its readable members are used",
    # prepare only
    "no_face": "prepare: the detector found no face",
    "face_too_small": "prepare: every face found is below --min-face",
    "bad_box": "prepare: a given face box (--boxes) that is not finite, or empty once clipped to its image",
}

CONVERT = {
    "gray": "grayscale, replicated to 3 channels",
    "cmyk": "CMYK or YCCK, converted to RGB",
    "rgba": "with transparency, composited by dropping alpha",
    "palette": "palette image, expanded to RGB",
    "16bit": "16-bit or integer pixels, scaled (not clipped) to 8 bits",
    "lab": "CIELAB, converted to RGB",
    "hsv": "HSV, converted to RGB",
}


class BadSample(Exception):
    """A sample that cannot be used; `.reason` is a key of `SKIP`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP, f"unknown skip reason {reason!r}: add it to mcf_fast/data/reasons.py"
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def table_markdown() -> str:
    """The vocabulary as a Markdown table (docs/data.md's copy is checked against it in the tests)."""
    rows = [f"| `{k}` | skipped | {v} |" for k, v in SKIP.items()]
    rows += [f"| `{k}` | converted | {v} |" for k, v in CONVERT.items()]
    return "\n".join(["| reason | kind | meaning |", "| --- | --- | --- |", *rows])
