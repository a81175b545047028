"""The loader's counters reach the metrics row: skipped and converted images, by reason."""
import io
import os

import numpy as np
import torch
from PIL import Image

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.train.runtime import Runtime
from mcf_fast.train.window import MetricsWindow


def test_metrics_row_carries_conversions_and_skips(tmp_path):
    """A gray and a CMYK image plus a FIFO: loader.stats() counts them and the row logs both dicts."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    for name, im in (("a.jpg", rgb), ("b.jpg", rgb.convert("L")), ("c.jpg", rgb.convert("CMYK"))):
        b = io.BytesIO()
        im.save(b, "JPEG")
        (tmp_path / name).write_bytes(b.getvalue())
    os.mkfifo(tmp_path / "d.jpg")
    loader = build_pretrain_loader(DataConfig(path=str(tmp_path), img_size=16, workers=0), batch_size=3, seed=0)
    next(loader)
    stats = loader.stats()
    assert stats["converted_by_reason"] == {"cmyk": 1, "gray": 1}
    rt = Runtime(torch.device("cpu"), "fp32", 0, 1, 0)
    row = MetricsWindow(rt.device).row(1, 1, rt, epoch=0.0, lr=0.0, momentum=0.0, eff_batch=3, data_s=0.0,
                                       data_stats=stats)
    assert row["data_converted_by_reason"] == {"cmyk": 1, "gray": 1}
    assert row["data_skipped_by_reason"] == {"not_regular_file": 1} and row["data_skipped"] == 1
