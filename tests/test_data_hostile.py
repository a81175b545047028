"""Hostile data: every tool (loader, scan, prepare) skips it, counts it by reason, reads nothing unbounded,
never hangs and never runs code from it. The files are built here, small."""
import io
import json
import os
import pickle
import struct
import tarfile
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from mcf_fast.data import DataConfig, build_pretrain_loader
from mcf_fast.data.decode import MAX_PIXELS, decode_rgb
from mcf_fast.data.files import MAX_FILE_MB, pread_member, walk_images
from mcf_fast.data.index import read_index
from mcf_fast.data.prepare import main as prepare_main
from mcf_fast.data.prepare import prepare
from mcf_fast.data.reasons import SKIP, BadSample
from mcf_fast.data.scan import scan
from mcf_fast.data.synthetic import draw_face

FACE = 64


def _jpeg(i=0, mode="RGB"):
    b = io.BytesIO()
    Image.fromarray(draw_face(0, i, FACE).image).convert(mode).save(b, "JPEG", quality=90)
    return b.getvalue()


def _claim(jpeg: bytes, w: int, h: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming w x h: a bomb costs a few bytes to build."""
    k = jpeg.index(b"\xff\xc0")
    return jpeg[:k + 5] + struct.pack(">HH", h, w) + jpeg[k + 9:]


def _png_claiming(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _finishes(fn, timeout=120):
    """Run fn in a thread; fail (instead of hanging the suite) when it does not return."""
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # handed to the test thread below
            box["err"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not finish in {timeout} s (blocked on a FIFO or an endless walk?)"
    if "err" in box:
        raise box["err"]
    return box["out"]


def _epoch_stats(path, **kw):
    loader = build_pretrain_loader(DataConfig(path=str(path), img_size=32, workers=0, **kw), batch_size=2,
                                   seed=0, drop_last=False)
    ids = [i for _ in range(loader.steps_per_epoch) for i in next(loader).sample_ids.tolist()]
    return loader, ids, loader.stats()


# --- item 2: pickles in LMDB -------------------------------------------------------------------------
class _Plant:
    """Unpickling this calls open(marker, 'w'): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _lmdb(path, keys_value=None, len_value=None, values=None):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    keys = [f"img{i}".encode() for i in range(len(values))]
    with env.begin(write=True) as txn:
        for k, v in zip(keys, values):
            txn.put(k, v)
        txn.put(b"__keys__", keys_value if keys_value is not None else pickle.dumps(keys))
        txn.put(b"__len__", len_value if len_value is not None else pickle.dumps(len(keys)))
    env.close()


def test_lmdb_pickles_never_run_code(tmp_path):
    """A pickle calling code in __keys__, __len__ or a value: meta keys refuse the database, a value
    is skipped as unsafe_pickle; the marker file the payload would create never appears."""
    marker = str(tmp_path / "PWNED")
    good = [pickle.dumps((_jpeg(i), i), protocol=p) for i, p in zip(range(4), (2, 3, 4, 5))]
    _lmdb(tmp_path / "keys", keys_value=pickle.dumps(_Plant(marker)), values=good)
    _lmdb(tmp_path / "len", len_value=pickle.dumps(_Plant(marker)), values=good)
    _lmdb(tmp_path / "vals", values=good + [pickle.dumps((_Plant(marker), 1))])
    for db in ("keys", "len"):
        with pytest.raises(ValueError, match=f"__{db}__ is not a plain pickle"):
            build_pretrain_loader(DataConfig(path=str(tmp_path / db), workers=0), batch_size=2)
        with pytest.raises(ValueError, match="not a plain pickle"):
            scan(str(tmp_path / db))
    loader, ids, st = _epoch_stats(tmp_path / "vals")
    assert loader.num_samples == 5 and 4 not in ids
    assert st["skipped_by_reason"] == {"unsafe_pickle": 1}  # protocol 2..5 (jpeg, label) values all read
    assert not os.path.exists(marker)


# --- item 13: FIFOs and devices named like images ----------------------------------------------------
@pytest.fixture
def fifo_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        (d / f"g{i}.jpg").write_bytes(_jpeg(i))
    os.mkfifo(d / "fifo.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    return d


def test_fifo_and_dev_zero_are_skipped_by_every_tool(fifo_folder, tmp_path):
    """A FIFO and a symlink to /dev/zero named .jpg: loader, scan and prepare finish, count
    not_regular_file twice and use the 3 real images."""
    loader, ids, st = _finishes(lambda: _epoch_stats(fifo_folder))
    assert loader.num_samples == 3 and st["skipped_by_reason"] == {"not_regular_file": 2}
    rep = _finishes(lambda: scan(str(fifo_folder)))
    assert rep["ok"] == 3 and dict(rep["skipped"]) == {"not_regular_file": 2}
    man = _finishes(lambda: prepare(str(fifo_folder), str(tmp_path / "out"), detector="none", min_face=8))
    assert man["samples"] == 3 and man["input_skipped_by_reason"] == {"not_regular_file": 2}


def test_fifo_named_in_a_list_file_is_checked_at_read_time(fifo_folder, tmp_path):
    """A list file naming the FIFO and /dev/zero directly: opened non-blocking, never read, counted."""
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(fifo_folder / n) for n in ("g0.jpg", "fifo.jpg", "zero.jpg", "g1.jpg")) + "\n")
    loader, ids, st = _finishes(lambda: _epoch_stats(lst))
    assert loader.num_samples == 4 and set(ids) == {0, 3}
    assert st["skipped_by_reason"]["not_regular_file"] >= 2
    rep = _finishes(lambda: scan(str(lst)))
    assert rep["ok"] == 2 and dict(rep["skipped"]) == {"not_regular_file": 2}


def test_fifo_named_like_a_shard_is_skipped(tmp_path):
    """A FIFO named s-000001.tar next to a real shard: loader and scan finish and count it."""
    d = tmp_path / "shards"
    d.mkdir()
    _tar(d / "s-000000.tar", [(f"g{i}.jpg", _jpeg(i)) for i in range(2)])
    os.mkfifo(d / "s-000001.tar")
    loader, ids, st = _finishes(lambda: _epoch_stats(d))
    assert loader.num_samples == 2 and st["skipped_by_reason"] == {"not_regular_file": 1}
    rep = _finishes(lambda: scan(str(d)))
    assert rep["ok"] == 2 and dict(rep["skipped"]) == {"not_regular_file": 1}


def test_hostile_list_files(tmp_path):
    """A NUL byte in a listed path is one unreadable_file; a binary list file is refused by name."""
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\nb\0c.jpg\n")
    loader, ids, st = _epoch_stats(lst)
    assert set(ids) == {0} and set(st["skipped_by_reason"]) == {"unreadable_file"}
    lst.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match="UTF-8 text"):
        build_pretrain_loader(DataConfig(path=str(lst), workers=0), batch_size=1)


# --- item 14: symlink loops ---------------------------------------------------------------------------
def test_symlinks_to_dot_do_not_make_the_walk_endless(tmp_path):
    """Two links to `.` and one to `..`: the walk finishes, lists each image once, counts the loops."""
    d = tmp_path / "imgs"
    (d / "a").mkdir(parents=True)
    (d / "r.jpg").write_bytes(_jpeg(0))
    (d / "a" / "s.jpg").write_bytes(_jpeg(1))
    os.symlink(".", d / "l1")
    os.symlink(".", d / "l2")
    os.symlink("..", d / "a" / "up")
    paths, stats = _finishes(lambda: walk_images(str(d)))
    assert sorted(os.path.relpath(p, d) for p in paths) == ["a/s.jpg", "r.jpg"]
    assert stats == {"symlink_loop": 3}
    loader, ids, st = _finishes(lambda: _epoch_stats(d))
    assert loader.num_samples == 2 and st["skipped_by_reason"] == {"symlink_loop": 3}


def test_walk_order_is_os_walks_order_for_good_folders(tmp_path):
    """Without loops, walk_images lists what os.walk(followlinks=True) did, in its order (resume stays
    exact); a folder linked twice is walked once, where os.walk first met it, and counted."""
    d, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    for sub in ("b", "a/z", "a/B", "c.d"):
        (d / sub).mkdir(parents=True)
    outside.mkdir()
    for n in ("b/2.jpg", "a/z/1.PNG", "a/B/x.jpeg", "c.d/0.jpg", "r.jpg", "Q.jpg", "a/note.txt"):
        (d / n).write_bytes(_jpeg(0))
    (outside / "o.jpg").write_bytes(_jpeg(1))
    os.symlink(outside, d / "a" / "link_out")

    def os_walk():
        out = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames.sort()
            out += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png")]
        return out
    assert walk_images(str(d)) == (os_walk(), {})
    os.symlink(d / "b", d / "a" / "link_to_b")  # b is now reachable twice
    want = [p for p in os_walk() if not p.startswith(str(d / "b") + os.sep)]
    paths, stats = walk_images(str(d))
    assert paths == want and str(d / "a" / "link_to_b" / "2.jpg") in paths and stats == {"duplicate_folder": 1}


def test_unreadable_subfolder_is_counted(tmp_path, monkeypatch):
    """A sub-folder that cannot be listed is counted as unreadable_folder, not skipped silently."""
    import mcf_fast.data.files as files
    d = tmp_path / "imgs"
    (d / "locked").mkdir(parents=True)
    (d / "ok.jpg").write_bytes(_jpeg(0))
    real = os.scandir

    def scandir(p):  # the test runs as root, where chmod 000 does not stop a listing
        if os.path.basename(p) == "locked":
            raise PermissionError(13, "Permission denied", p)
        return real(p)
    monkeypatch.setattr(files.os, "scandir", scandir)
    paths, stats = walk_images(str(d))
    assert len(paths) == 1 and stats == {"unreadable_folder": 1}


# --- item 15: a tar header claiming 60 GiB ------------------------------------------------------------
def test_tar_member_claiming_60_gib_is_too_large(tmp_path):
    """The loader and scan count too_large (and the cut shard) and keep the good members: no MemoryError."""
    p = tmp_path / "s.tar"
    _tar(p, [(f"g{i}.jpg", _jpeg(i)) for i in range(3)])
    with tarfile.open(p) as tf:
        last = tf.getmembers()[-1]
    raw = p.read_bytes()[:last.offset_data + -(-last.size // 512) * 512]  # drop the end-of-archive blocks
    big = tarfile.TarInfo("big.jpg")
    big.size = 60 << 30
    p.write_bytes(raw + big.tobuf(format=tarfile.GNU_FORMAT) + _jpeg(3))
    loader, ids, st = _epoch_stats(p)
    assert loader.num_samples == 3 and st["skipped_by_reason"] == {"too_large": 1, "corrupt_shard": 1}
    rep = scan(str(p))
    assert rep["ok"] == 3 and dict(rep["skipped"]) == {"too_large": 1, "corrupt_shard": 1}


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_long_name_or_pax_header_claiming_60_gib_is_not_allocated(tmp_path, kind):
    """A GNU long-name or pax header whose size field says 60 GiB: tarfile's read of it is bounded by
    the file, the shard counts corrupt_shard and keeps the member before it."""
    p = tmp_path / "s.tar"
    _tar(p, [("g0.jpg", _jpeg(0))])
    with tarfile.open(p) as tf:
        last = tf.getmembers()[-1]
    head = tarfile.TarInfo("x")
    head.type, head.size = kind, 60 << 30
    raw = p.read_bytes()[:last.offset_data + -(-last.size // 512) * 512]
    p.write_bytes(raw + head.tobuf(format=tarfile.GNU_FORMAT) + b"y" * 4096)
    loader, ids, st = _epoch_stats(p)
    assert loader.num_samples == 1 and st["skipped_by_reason"] == {"corrupt_shard": 1}


def test_index_claiming_a_huge_member_is_refused_before_reading(tmp_path):
    """An index (ours or hand-made) claiming a huge member size: too_large, nothing allocated."""
    p = tmp_path / "s.tar"
    _tar(p, [("g.jpg", _jpeg(0))])
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(BadSample, match="too_large"):
            pread_member(fd, 512, 60 << 30, MAX_FILE_MB << 20, str(p), "g")
        with pytest.raises(BadSample, match="corrupt"):  # past the end of the file: cut short
            pread_member(fd, 512, 1 << 20, MAX_FILE_MB << 20, str(p), "g")
    finally:
        os.close(fd)


# --- item 16: decompression bombs ---------------------------------------------------------------------
@pytest.mark.parametrize("side", [20000, 65500])
def test_jpeg_header_claiming_huge_dimensions_is_not_decoded(side):
    """A JPEG whose header claims side x side pixels is too_large from its header, with every decoder."""
    bomb = _claim(_jpeg(0), side, side)
    for decoder in ("simplejpeg", "pillow"):
        with pytest.raises(BadSample, match="too_large"):
            decode_rgb(bomb, decoder)
    decode_rgb(_claim(_jpeg(0), FACE, FACE), "pillow")  # the patch itself leaves a decodable JPEG


def test_png_bomb_and_the_pixel_limit_is_configurable(tmp_path):
    """A PNG header claiming 65500^2: too_large; data.max_pixels lowers the limit for real images."""
    with pytest.raises(BadSample, match="too_large"):
        decode_rgb(_png_claiming(65500, 65500))
    with pytest.raises(BadSample, match="too_large"):
        decode_rgb(_jpeg(0), "simplejpeg", 1, FACE * FACE - 1)
    assert decode_rgb(_jpeg(0), "simplejpeg", 1, FACE * FACE)[0].shape == (FACE, FACE, 3)
    p = tmp_path / "s.tar"
    _tar(p, [("g0.jpg", _jpeg(0)), ("bomb.jpg", _claim(_jpeg(1), 65500, 65500)), ("g1.jpg", _jpeg(1))])
    loader, ids, st = _epoch_stats(p)
    assert set(st["skipped_by_reason"]) == {"too_large"} and 1 not in ids  # counted each time it is met


def test_size_limits_match_the_config_and_are_range_checked():
    """DataConfig's defaults are the readers' defaults; out-of-range limits are refused by name."""
    cfg = DataConfig()
    assert (cfg.max_file_mb, cfg.max_pixels) == (MAX_FILE_MB, MAX_PIXELS)
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS is None
    for name, value in (("max_file_mb", 0), ("max_pixels", 10)):
        with pytest.raises(ValueError, match=name):
            DataConfig(**{name: value}).validate()


def test_big_file_in_a_folder_is_too_large_unread(tmp_path):
    """A file above data.max_file_mb is skipped as too_large."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes(_jpeg(0))
    (d / "b.jpg").write_bytes(_jpeg(1) + b"\0" * (1 << 20))
    loader, ids, st = _epoch_stats(d, max_file_mb=1)
    assert set(st["skipped_by_reason"]) == {"too_large"} and set(ids) == {0}


# --- item 17: member names an index cannot hold -------------------------------------------------------
def test_member_name_with_a_newline_is_left_out_of_every_index(tmp_path):
    """scan --write-index and prepare count bad_name and write indexes whose line count matches."""
    shards = tmp_path / "in"
    shards.mkdir()
    p = shards / "s.tar"
    _tar(p, [("g0.jpg", _jpeg(0)), ("evil\nname.jpg", _jpeg(1)), ("tab\tx.jpg", _jpeg(2)), ("g3.jpg", _jpeg(3))])
    rep = scan(str(p), write_index=True)
    assert rep["ok"] == 2 and dict(rep["skipped"]) == {"bad_name": 2}
    assert [k for k, _, _ in read_index(str(p) + ".idx")] == ["g0", "g3"]
    loader, ids, st = _epoch_stats(p, require_validated=True)
    assert loader.num_samples == 2 and st["skipped_by_reason"] == {"bad_name": 2}
    man = prepare(str(p), str(tmp_path / "out"), detector="none", min_face=8)
    assert man["samples"] == 2 and man["skipped_by_reason"] == {"bad_name": 2}
    assert len(read_index(str(tmp_path / "out" / "faces-000000.tar.idx"))) == 2


def test_an_index_whose_count_disagrees_is_refused_with_the_fix(tmp_path):
    """read_index names the mismatch and the command that rewrites the index."""
    p = tmp_path / "x.tar.idx"
    p.write_text("v1.2 3\njpg 512 10 a.jpg\n")
    with pytest.raises(ValueError, match="scan --write-index"):
        read_index(str(p))


# --- item 18: a tar cut mid-member ---------------------------------------------------------------------
def test_tar_cut_mid_member_keeps_the_readable_samples_in_every_tool(tmp_path):
    """8 members, cut inside the 8th: loader, scan (+ its index) and prepare all use the 7 readable ones."""
    d = tmp_path / "in"
    d.mkdir()
    p = d / "s.tar"
    _tar(p, [(f"g{i}.jpg", _jpeg(i)) for i in range(8)])
    with tarfile.open(p) as tf:
        last = tf.getmembers()[-1]
    p.write_bytes(p.read_bytes()[:last.offset_data + last.size // 2])
    loader, ids, st = _epoch_stats(p)
    assert loader.num_samples == 7 and st["skipped_by_reason"] == {"corrupt_shard": 1}
    rep = scan(str(p), write_index=True)
    assert rep["ok"] == 7 and dict(rep["skipped"]) == {"corrupt_shard": 1}
    assert len(read_index(str(p) + ".idx")) == 7
    out = tmp_path / "out"
    assert prepare_main(["--input", str(p), "--out", str(out), "--detector", "none", "--min-face", "8",
                         "--workers", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    entry = man["shards"]["faces-000000.tar"]
    assert entry["inputs"] == 7 and man["samples"] == 7 and entry["skipped_by_reason"] == {"corrupt_shard": 1}


# --- item 19: prepare's output overlapping its input ---------------------------------------------------
def test_prepare_refuses_an_output_overlapping_the_input(tmp_path, capsys):
    """--out equal to, inside, or above the input (also through a symlink) is refused before any write."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(3):
        (raw / f"g{i}.jpg").write_bytes(_jpeg(i))
    _tar(raw / "s-000000.tar", [(f"k{i}.jpg", _jpeg(i)) for i in range(2)])
    os.symlink(raw, tmp_path / "link")
    before = {n: (raw / n).read_bytes() for n in os.listdir(raw)}
    for inp, out in ((raw, raw), (raw, raw / "crops"), (raw, tmp_path / "data"), (raw, tmp_path / "link"),
                     (raw / "s-000000.tar", raw), (raw / "s-000000.tar", tmp_path / "link" / "x")):
        assert prepare_main(["--input", str(inp), "--out", str(out), "--detector", "none", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert "outside the input" in err and len(err.strip().splitlines()) == 1
    assert {n: (raw / n).read_bytes() for n in os.listdir(raw)} == before  # nothing written, nothing lost


# --- item 20: one vocabulary, conversions counted -----------------------------------------------------
def test_same_problem_same_reason_in_every_tool(tmp_path):
    """A 0-byte shard is empty_shard and a missing listed file is unreadable_file in loader, scan and prepare."""
    d = tmp_path / "in"
    d.mkdir()
    _tar(d / "s-000000.tar", [("g0.jpg", _jpeg(0))])
    (d / "s-000001.tar").write_bytes(b"")
    pattern = str(d / "s-{000000..000001}.tar")
    assert _epoch_stats(pattern)[2]["skipped_by_reason"] == {"empty_shard": 1}
    assert dict(scan(pattern)["skipped"]) == {"empty_shard": 1}
    (tmp_path / "files").mkdir()
    lst = tmp_path / "files" / "list.txt"
    (tmp_path / "files" / "a.jpg").write_bytes(_jpeg(0))
    lst.write_text("a.jpg\nmissing.jpg\n")
    assert set(_epoch_stats(lst)[2]["skipped_by_reason"]) == {"unreadable_file"}
    assert dict(scan(str(lst))["skipped"]) == {"unreadable_file": 1}
    man = prepare(str(lst), str(tmp_path / "out"), detector="none", min_face=8)
    assert man["skipped_by_reason"] == {"unreadable_file": 1}


def test_prepare_records_conversions(tmp_path):
    """Gray and CMYK inputs are counted by kind in prepare's manifest (converted_by_reason)."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jpg").write_bytes(_jpeg(0, "L"))
    (d / "b.jpg").write_bytes(_jpeg(1, "CMYK"))
    (d / "c.jpg").write_bytes(_jpeg(2))
    man = prepare(str(d), str(tmp_path / "out"), detector="none", min_face=8)
    assert man["shards"]["faces-000000.tar"]["converted_by_reason"] == {"gray": 1, "cmyk": 1}


def test_every_reason_has_a_meaning_and_unknown_reasons_are_refused():
    """reasons.SKIP is the vocabulary: every entry has a one-line meaning; BadSample refuses other names."""
    assert all(v and "\n" not in v for v in SKIP.values())
    with pytest.raises(AssertionError, match="reasons.py"):
        BadSample("corrupt_shrad")
    assert np.all([BadSample(r).reason == r for r in SKIP])


def test_reliability_page_documents_the_vocabulary():
    """docs/reliability.md points to the one table of skip/convert reasons, docs/data.md's, which is the
    one in reasons.py, row for row."""
    from mcf_fast.data.reasons import table_markdown
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    with open(os.path.join(docs, "reliability.md")) as f:
        assert "docs/data.md" in f.read()
    with open(os.path.join(docs, "data.md")) as f:
        assert table_markdown() in f.read()


@pytest.mark.parametrize("text", ["{not json", '{"shards": {"s.tar": {"samples": "7"}}}', '["a"]',
                                  '{"shards": {"s.tar": {"samples": 1, "skipped_by_reason": {"x": -3}}}}'])
def test_a_malformed_manifest_is_refused_at_start_with_the_fix(tmp_path, text):
    """A damaged or hand-edited manifest.json stops the loader at start-up, naming the file and the fix."""
    _tar(tmp_path / "s.tar", [("g.jpg", _jpeg(0))])
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="manifest.*scan --write-index"):
        build_pretrain_loader(DataConfig(path=str(tmp_path / "s.tar"), workers=0), batch_size=1)


def test_every_reason_the_data_code_counts_is_in_the_vocabulary():
    """Each literal reason in mcf_fast/data (BadSample(...), stats[...] += ...) is a key of reasons.SKIP."""
    import re

    import mcf_fast.data as pkg
    folder = os.path.dirname(pkg.__file__)
    used = set()
    for f in os.listdir(folder):
        if f.endswith(".py"):
            with open(os.path.join(folder, f)) as fh:
                src = fh.read()
            used |= set(re.findall(r'BadSample\("(\w+)"', src))
            used |= set(re.findall(r'(?:stats|walk|skipped"\])\["(\w+)"\] \+?=', src))
            used |= {w for pair in re.findall(r'stats\["(\w+)" if .*? else "(\w+)"\]', src) for w in pair}
            used |= set(re.findall(r'_bad\(\w+, "(\w+)"', src))
    used -= {"ok"}  # scan's report counts usable samples beside its Counter of reasons
    assert {"not_regular_file", "too_large", "symlink_loop", "bad_name", "missing_shard"} <= used  # it finds them
    assert used <= set(SKIP), used - set(SKIP)
