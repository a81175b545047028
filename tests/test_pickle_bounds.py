"""The opcode walk every accepted pickle passes first: real files of each supported layout pass well under
the limits, hostile streams (bombs, memo jumps, numpy allocations, deep nesting, shared growth, inflating
zip records, storages the file does not hold, expanded tensor views) are refused by name before anything
is built."""
import argparse
import collections
import io
import pickle
import zipfile

import hostile
import numpy as np
import pytest
import torch

from mcf_fast.model.vit import VisionTransformer
from mcf_fast.pickle_bounds import NODES_PER_BYTE, PickleBoundsError, RefusedFile, budget
from mcf_fast.pickle_walk import check_pickle
from mcf_fast.safe_load import check_torch_file, safe_torch_load

PLAIN = [1, -5, 2**70, 1.5, "x" * 300, b"y" * 1000, None, True, (1, 2, 3), [1, [2, [3]]], {"a": {1, 2}},
         frozenset([3]), collections.OrderedDict(a=1), argparse.Namespace(lr=0.1, name="x", t=(1, 2)),
         np.float64(2.5), np.int64(7), np.zeros((3, 4), np.float32), np.arange(10), np.array(["ab", "c"]),
         np.dtype("f8"), bytearray(b"abc"), np.str_("hello"), "é\n\\x", list(range(300))]


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_of_every_protocol_passes(protocol):
    """Containers, numbers, strings, Namespace, numpy scalars, dtypes and arrays pickled by CPython pass."""
    shared = [1, 2]
    for obj in [*PLAIN, {"a": shared, "b": shared}]:
        check_pickle(pickle.dumps(obj, protocol=protocol), "x")


def _data_pkl(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(z.namelist()[0].split("/")[0] + "/data.pkl")


def _real_files(tmp_path) -> dict:
    """A ViT state dict, an MAE-style training checkpoint (optimizer state, args with numpy scalars) and
    LAION-Face-style detections (legacy format, numpy arrays), small but laid out like the real ones."""
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    opt = torch.optim.AdamW(vit.parameters())
    vit(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, mask_ratio=np.float64(0.75), epochs=400)
    files = {"vit": {"model": vit.state_dict()},
             "mae": {"model": vit.state_dict(), "optimizer": opt.state_dict(), "epoch": 399, "args": args,
                     "scaler": {"scale": 65536.0, "_growth_tracker": 1000}}}
    rng = np.random.default_rng(0)
    det = {i: [(rng.random(4, np.float32) * 99, rng.random((5, 2), np.float32), np.float32(0.9))] * (1 + i % 3)
           for i in range(300)}
    out = {}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        out[name] = _data_pkl(tmp_path / f"{name}.pth")
    torch.save(det, tmp_path / "det.pth", _use_new_zipfile_serialization=False)
    torch.save(det, tmp_path / "det_zip.pth")
    out["det"] = _data_pkl(tmp_path / "det_zip.pth")
    return out


def test_real_layouts_expand_well_under_the_budget(tmp_path):
    """Every supported layout expands under 1 object per byte (the limit allows NODES_PER_BYTE) and loads."""
    for name, pkl in _real_files(tmp_path).items():
        w = check_pickle(pkl, name, persistent=True)
        assert w.max_size < len(pkl) <= len(pkl) * NODES_PER_BYTE and w.max_depth <= 12, (name, w.max_size, len(pkl))
    for f in ("vit.pth", "mae.pth", "det.pth", "det_zip.pth"):
        safe_torch_load(str(tmp_path / f), arrays=True)


@pytest.mark.parametrize("name, why", [
    ("shared-tuple bomb", "expands to more than"), ("memo jump", "memo index 1073741824 jumps"),
    ("numpy sub-array scalar", "numpy dtype 'V1073741824'"), ("object array", "numpy dtype 'O8'"),
    ("deep list", "nests deeper than 100"), ("grow after share", "modified after it was referenced"),
])
def test_hostile_pickles_are_refused_by_name(name, why):
    """Each hostile stream (under 2 KB) is refused with its reason, as a one-line RefusedFile (a ValueError)."""
    data = hostile.HOSTILE_PICKLES[name]
    assert len(data) <= 2048
    with pytest.raises(PickleBoundsError, match=why) as e:
        check_pickle(data, "f.pth")
    assert isinstance(e.value, RefusedFile) and isinstance(e.value, ValueError)
    assert len(str(e.value).splitlines()) == 1 and str(e.value).startswith("f.pth: ") and not e.value.malformed


def test_the_bomb_costs_nothing_to_walk():
    """The 64-level shared tuple is refused at level 20: the walk counts expansions, it never expands."""
    data = hostile.shared_tuple_bomb(64)
    with pytest.raises(PickleBoundsError) as e:
        check_pickle(data, "x")
    assert f"{budget(len(data))} objects" in str(e.value)  # 2^20 + 4 per byte
    w = check_pickle(hostile.shared_tuple_bomb(19), "x")  # 2^19 leaves: within the floor, walked in ~130 ops
    assert w.max_size == 2**20 + 1 and w.opcodes < 160


def test_memo_indices_must_be_sequential():
    """A PUT may reuse an entry or add the next one, never leave a gap (what sizes the C unpickler's table)."""
    check_pickle(b"\x80\x02N\x940N\x940h\x01.", "x")
    check_pickle(b"\x80\x02Nq\x000Nq\x010Nq\x000h\x01.", "x")
    with pytest.raises(PickleBoundsError, match="jumps past the 2 entries"):
        check_pickle(b"\x80\x02Nq\x000Nq\x010Nq\x05h\x01.", "x")


@pytest.mark.parametrize("data", [b"", b"\x80\x02", b"\x80\x02]a.", b"\x80\x02(.", b"\x80\x02\xff.",
                                  b"\x80\x02X\xff\xff\xff\x00ab.", b"\x80\x02h\x07."])
def test_malformed_streams_are_malformed(data):
    """Cut, unbalanced or unknown streams are refused as malformed (damage), not as hostile."""
    with pytest.raises(PickleBoundsError) as e:
        check_pickle(data, "x")
    assert e.value.malformed


def test_damaged_real_pickles_never_escape_as_other_errors():
    """Truncations and byte flips of a real checkpoint pickle either pass or raise PickleBoundsError."""
    buf = io.BytesIO()
    torch.save({"model": VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2).state_dict()}, buf)
    pkl = _data_pkl(buf)
    rng = np.random.default_rng(0)
    for i in range(300):
        d = bytearray(pkl[:rng.integers(1, len(pkl))] if i % 2 else pkl)
        d[rng.integers(0, len(d))] = rng.integers(0, 256)
        try:
            check_pickle(bytes(d), "x", persistent=True)
        except PickleBoundsError:
            pass


def test_torch_zip_holding_a_bomb_is_refused_before_torch_reads_it(tmp_path):
    """A zip checkpoint whose data.pkl is the shared-tuple bomb: safe_torch_load refuses it, one line."""
    (tmp_path / "b.pth").write_bytes(hostile.torch_zip(hostile.shared_tuple_bomb()))
    with pytest.raises(RefusedFile, match=r"b\.pth \(archive/data\.pkl\): it expands"):
        safe_torch_load(str(tmp_path / "b.pth"))


def test_compressed_zip_record_is_refused(tmp_path):
    """A deflated storage record (260 KB inflating to 256 MB) is refused: torch.save never compresses."""
    data = hostile.deflated_torch_zip()
    assert len(data) < 300_000
    with pytest.raises(RefusedFile, match="is compressed"):
        check_torch_file(data, "d.pth")


def test_data_pkl_is_the_record_torch_reads(tmp_path):
    """The walk reads PREFIX/data.pkl with PREFIX from the first record, as torch does: a benign decoy
    elsewhere does not hide the bomb, and repeated names are refused."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil/data.pkl", hostile.shared_tuple_bomb())
        z.writestr("good/data.pkl", pickle.dumps({}, protocol=2))
    with pytest.raises(RefusedFile, match="evil/data.pkl"):
        check_torch_file(buf.getvalue(), "z.pth")
    with zipfile.ZipFile(buf, "a") as z, pytest.warns(UserWarning):
        z.writestr("evil/data.pkl", b"x")
    with pytest.raises(RefusedFile, match="repeated record names"):
        check_torch_file(buf.getvalue(), "z.pth")


def test_legacy_format_may_not_claim_storage_it_lacks(tmp_path):
    """A legacy-format checkpoint whose pickle claims 2^40 floats with a few bytes of storage is refused."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    safe_torch_load(raw)
    bad = raw.replace(b"K\x03Nt", b"\x8a\x06\x00\x00\x00\x00\x00\x01Nt", 1)  # the storage's numel 3 -> 2^40
    assert bad != raw
    with pytest.raises(RefusedFile, match="claim 4398046511104 bytes of storage"):
        safe_torch_load(bad, name="legacy.pth")


def test_plain_pickle_is_walked_then_refused_by_torch(tmp_path):
    """A plain pickle (not torch's format) is walked as the one pickle torch.load reads, then refused."""
    (tmp_path / "p.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(RefusedFile, match="weights-only torch checkpoint"):
        safe_torch_load(str(tmp_path / "p.pth"))
    (tmp_path / "b.pth").write_bytes(hostile.shared_tuple_bomb())
    with pytest.raises(RefusedFile, match="expands"):
        safe_torch_load(str(tmp_path / "b.pth"))


def test_expanded_tensor_view_is_refused(tmp_path):
    """A tensor that is a 2^30-element view of one stored number (stride 0) is refused after loading,
    before any consumer materialises it; views within their storage (tied or sliced) load."""
    base = torch.zeros(4)
    torch.save({"ok": base[1:3], "tied": base, "big": torch.zeros(1).expand(1 << 30)}, tmp_path / "v.pth")
    with pytest.raises(RefusedFile, match=r"shape \(1073741824,\) is a view larger than the 4 bytes"):
        safe_torch_load(str(tmp_path / "v.pth"))
    torch.save({"ok": base[1:3], "tied": base}, tmp_path / "w.pth")
    assert safe_torch_load(str(tmp_path / "w.pth"))["ok"].shape == (2,)


def test_reliability_page_names_every_limit_with_its_value():
    """docs/reliability.md states each limit constant as `NAME` = value, the value the code uses."""
    import os

    import mcf_fast.data.decode as decode
    import mcf_fast.pickle_bounds as pb
    import mcf_fast.pickle_numpy as pn
    import mcf_fast.safe_load as sl
    import mcf_fast.train.ckpt_integrity as ci
    import mcf_fast.train.dcp_values as dv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    page = open(os.path.join(root, "docs", "reliability.md")).read()
    for mod, names in ((pb, "MAX_NODES_FLOOR NODES_PER_BYTE MAX_DEPTH BYTES_PER_NODE MAX_INT_BYTES PROTOCOL_MAX"),
                       (pn, "NUMPY_MAX_ITEMSIZE MAX_DIMS"), (decode, "MAX_PIXELS MAX_JPEG_SCANS JPEG_SCAN_WORK"),
                       (ci, "MAX_JSON_BYTES"), (sl, "SAFETENSORS_MAX_HEADER"), (dv, "MAX_DIMS")):
        for name in names.split():
            assert f"`{name}` = {getattr(mod, name)}" in page, name
