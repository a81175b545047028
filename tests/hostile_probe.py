"""Memory probe for hostile files (run by tests/test_security_files.py as one subprocess; not a test).

Builds each small hostile file in a temporary folder and hands it to every entry point that reads it,
in this process: convert FILE / RUN, pretrain's teacher check, the init / decoder-init reader, prepare
--boxes, the resume checkpoint scan and load, scan and the loader on an LMDB, eval's encoder, the image
decoder. Every entry point is first run once on a good file (so one-time costs such as imports and
thread pools are in the baseline). Prints one JSON line: per case whether it was refused with one line,
its message and seconds, and how far the peak RSS (VmHWM) grew over the baseline.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import tempfile
import time

import hostile
import torch

from mcf_fast.procmem import peak_rss_bytes


def _rss_mb() -> float:
    return peak_rss_bytes() / 2**20  # VmHWM: ru_maxrss would include the test runner's peak (procmem.py)


def _call(fn):
    """(refused, message): an exit code >= 2, a SystemExit(2), a raised error, or a skip counted by reason."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = fn()
    except SystemExit as e:
        return e.code not in (0, None), err.getvalue()
    except Exception as e:  # the readers raise; the message is what a CLI would print
        return True, f"{type(e).__name__}: {e}"
    if isinstance(rc, str):  # a reason a reader skipped the sample for
        return True, rc
    return isinstance(rc, int) and rc >= 2, err.getvalue()


class Probe:
    def __init__(self, tmp: str):
        self.tmp, self.cases = tmp, {}

    def path(self, name: str, data: bytes | str | None = None) -> str:
        p = os.path.join(self.tmp, name)
        if data is not None:
            with open(p, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        return p

    def run(self, name: str, fn) -> None:
        t = time.perf_counter()
        refused, msg = _call(fn)
        lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
        self.cases[name] = {"refused": refused, "one_line": len(lines) == 1 and "Traceback" not in msg,
                            "message": msg.strip()[:240], "seconds": round(time.perf_counter() - t, 3),
                            "peak_mb": round(_rss_mb(), 1)}


def _good_files(p: Probe) -> dict:
    """Small valid inputs for the warm-up: a ViT checkpoint, a shard with a box file, an LMDB, a run."""
    from test_checkpoint_integrity import _save, _tiny
    from test_data_boxes import _shard
    from test_data_hostile import _jpeg, _lmdb

    from mcf_fast.model.vit import VisionTransformer
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": vit.state_dict()}, p.path("good.pth"))
    shard = _shard(__import__("pathlib").Path(p.path("s.tar")), [("k", 1)])
    _lmdb(__import__("pathlib").Path(p.path("good.lmdb")), values=[pickle.dumps((_jpeg(i), i)) for i in range(4)])
    run = p.path("run")
    _save(os.path.join(run, "checkpoints"), 1, _tiny())
    return {"pth": p.path("good.pth"), "shard": str(shard), "boxes": p.path("b.json", json.dumps({"1": [[1, 2, 9, 9]]})),
            "lmdb": p.path("good.lmdb"), "run": run}


def _entry_points(p: Probe, good: dict) -> dict:
    """name -> function(path) returning an exit code (or raising) for each entry point."""
    from test_pretrain_e2e import TINY

    from mcf_fast import convert
    from mcf_fast.data import DataConfig, build_pretrain_loader
    from mcf_fast.data.prepare import main as prepare_main
    from mcf_fast.data.scan import main as scan_main
    from mcf_fast.model.checkpoints import read_file
    from mcf_fast.train import checkpoint as ckpt
    from mcf_fast.train.cli import parse_args

    def loader_skip(path):
        loader = build_pretrain_loader(DataConfig(path=path, workers=0, img_size=32), batch_size=5, seed=0,
                                       drop_last=False)
        next(loader)
        return ",".join(loader.stats()["skipped_by_reason"]) or 0

    def resume(run):
        latest = ckpt.latest(os.path.join(run, "checkpoints"))
        from test_checkpoint_integrity import _tiny
        ckpt.load(latest, *_tiny())
        return 0

    return {
        "convert FILE": lambda f: convert.main([f, "--out", p.path("o.pt")]),
        "convert RUN": lambda r: convert.main([r, "--out", p.path("o2.pt")]),
        "teacher": lambda f: parse_args(["--out", p.path("r"), *TINY, "--model.teacher", f"checkpoint:{f}"]) and 0,
        "init / decoder_init reader": lambda f: read_file(f) and 0,
        "prepare --boxes": lambda f: prepare_main(["--input", good["shard"], "--out", p.path("faces"), "--boxes", f,
                                                   "--workers", "1", "--size", "32", "--min-face", "4"]),
        "resume": resume,
        "scan": lambda d: scan_main([d, "--workers", "1"]),
        "loader": loader_skip,
    }


def main() -> int:
    from test_security_dcp import _rehash

    from mcf_fast.data.decode import decode_rgb
    from mcf_fast.eval.encoders import build_encoder
    with tempfile.TemporaryDirectory() as tmp:
        p = Probe(tmp)
        good = _good_files(p)
        ep = _entry_points(p, good)
        for name, arg in (("convert FILE", good["pth"]), ("convert RUN", good["run"]), ("teacher", good["pth"]),
                          ("init / decoder_init reader", good["pth"]), ("prepare --boxes", good["boxes"]),
                          ("resume", good["run"]), ("scan", good["lmdb"]), ("loader", good["lmdb"])):
            refused, msg = _call(lambda: ep[name](arg))
            assert not refused, (name, msg)  # the warm-up must succeed, or the baseline means nothing
        base = _rss_mb()
        _hostile_cases(p, ep, good, _rehash, decode_rgb, build_encoder)
        print(json.dumps({"baseline_mb": round(base, 1), "peak_growth_mb": round(_rss_mb() - base, 1),
                          "cases": p.cases}))
    return 0


def _hostile_cases(p: Probe, ep: dict, good: dict, rehash, decode_rgb, build_encoder) -> None:
    from test_data_hostile import _jpeg, _lmdb
    pths = {"bomb": hostile.torch_zip(hostile.shared_tuple_bomb()), "memo jump": hostile.torch_zip(hostile.memo_jump()),
            "numpy sub-array scalar": hostile.torch_zip(hostile.numpy_subarray_scalar()),
            "deep": hostile.torch_zip(hostile.deep_list()), "shared box": hostile.torch_zip(hostile.shared_box()),
            "deflated 260 KB": hostile.deflated_torch_zip()}
    for kind, data in pths.items():
        f = p.path(kind.replace(" ", "_") + ".pth", data)
        for entry in ("convert FILE", "teacher", "init / decoder_init reader", "prepare --boxes"):
            p.run(f"{entry}: {kind}", lambda: ep[entry](f))
    for name, text in hostile.box_json_cases().items():
        f = p.path(name, text)
        p.run(f"prepare --boxes: {name}", lambda: ep["prepare --boxes"](f))
    for kind, data in (("bomb", hostile.shared_tuple_bomb()), ("memo jump", hostile.memo_jump())):
        meta = os.path.join(good["run"], "checkpoints", "step_00000001", ".metadata")
        keep = open(meta, "rb").read()
        open(meta, "wb").write(data)
        rehash(os.path.dirname(meta))
        for entry in ("convert RUN", "resume"):
            p.run(f"{entry}: .metadata {kind}", lambda: ep[entry](good["run"]))
        open(meta, "wb").write(keep)
        rehash(os.path.dirname(meta))
    extra = os.path.join(good["run"], "checkpoints", "step_00000001", "extra_rank0.pt")
    open(extra, "wb").write(hostile.torch_zip(hostile.shared_tuple_bomb()))
    rehash(os.path.dirname(extra))
    p.run("resume: extra_rank0.pt bomb", lambda: ep["resume"](good["run"]))
    good_vals = [pickle.dumps((_jpeg(i), i), protocol=2) for i in range(4)]
    import pathlib
    _lmdb(pathlib.Path(p.path("keys.lmdb")), keys_value=hostile.shared_tuple_bomb(), values=good_vals)
    p.run("scan: LMDB __keys__ bomb", lambda: ep["scan"](p.path("keys.lmdb")))
    _lmdb(pathlib.Path(p.path("vals.lmdb")), values=good_vals + [hostile.memo_jump()])
    p.run("loader: LMDB value memo jump", lambda: ep["loader"](p.path("vals.lmdb")))
    os.makedirs(p.path("enc"))
    torch.save({"a": torch.zeros(2)}, p.path("enc/encoder.safetensors"))
    json.dump({"format": "mcf_fast.encoder.v1"}, open(p.path("enc/encoder.json"), "w"))
    p.run("eval: pickle named encoder.safetensors", lambda: build_encoder(p.path("enc/encoder.safetensors"), None, None, 0))
    p.run("decode: JPEG with 300 scans", lambda: decode_rgb(_many_scans()))


def _many_scans() -> bytes:
    """A progressive JPEG whose last scan is repeated until it has 300 scans."""
    import numpy as np
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(
        b, "JPEG", progressive=True)
    data = b.getvalue()
    last = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last * (300 - data.count(b"\xff\xda")) + b"\xff\xd9"


if __name__ == "__main__":
    sys.exit(main())
