"""The data source registry: recognition, pre-flight checks, the help it feeds, and a toy kind added in one class."""
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
from test_pretrain_e2e import TINY

from mcf_fast import pretrain
from mcf_fast.data import DataConfig
from mcf_fast.data.config import help_texts
from mcf_fast.data.sources import SOURCES, DataSource, check_data, find_source, open_data
from mcf_fast.data.synthetic import main as synth_main


class ToySquares(DataSource):
    """A whole new source in one class: `toy:N` is N flat grey squares, shade from the index."""

    name = "toy"
    summary = "flat grey squares drawn from their index (a test source)"
    recognised = "toy:N for N flat grey squares"

    @classmethod
    def recognises(cls, path):
        return path.startswith("toy:")

    @classmethod
    def precheck(cls, cfg, need, option="--data.path"):
        n = int(cfg.path[4:]) if cfg.path[4:].isdigit() else 0
        if n < need:
            raise ValueError(f"{option} {cfg.path!r}: {n} squares, fewer than one step's {need}")

    @classmethod
    def build(cls, cfg, seed):
        return cls(int(cfg.path[4:]), cfg.img_size)

    def __init__(self, n, size):
        self.num_samples, self.size = n, size
        self.counts, self.index_stats = np.array([n]), Counter()

    def read(self, i):
        return np.full((self.size, self.size, 3), 40 + 7 * i % 200, np.uint8), f"toy/{i}"


@pytest.fixture
def toy():
    with SOURCES.registered(ToySquares):  # the one registry line
        yield ToySquares


@pytest.fixture(scope="module")
def five_shard(tmp_path_factory):
    """One validated shard of 5 synthetic faces (its manifest says 5)."""
    out = tmp_path_factory.mktemp("five")
    synth_main(["--out", str(out), "--num", "5", "--size", "32", "--format", "wds"])
    return str(out / "faces-000000.tar")


def _fail(argv, capsys) -> str:
    """pretrain's main() on argv must exit 2 with exactly one line and no traceback."""
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_toy_source_trains_after_one_registry_line(toy, tmp_path, capsys):
    """A source added as one class + `SOURCES.register` is recognised, checked, shown in --help and trained from."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    assert "toy: toy:N for N flat grey squares" in " ".join(capsys.readouterr().out.split())
    line = _fail(["--out", str(out), *TINY, "--data.path", "toy:5"], capsys)
    assert "5 squares, fewer than one step's 8" in line and not out.exists()
    assert pretrain.main(["--out", str(out), "--max-steps", "3", *TINY, "--data.path", "toy:40",
                          "--run.log_every", "1", "--run.tensorboard", "false", "--run.export", "false"]) == 0
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_registry_lists_every_kind_in_recognition_order():
    """The built-in kinds, in the order paths are matched (LMDB and shard folders before plain folders)."""
    assert SOURCES.names()[:5] == ("lmdb", "shards", "list", "folder", "synthetic")
    fields = {f for f in DataConfig.__dataclass_fields__}
    for entry in SOURCES:
        assert entry.summary and entry.recognised and set(entry.fields) <= fields, entry.name
    assert help_texts()["synthetic_size"].endswith("[read by the synthetic source]")
    assert "[read by" not in help_texts()["hflip"]  # every kind's images are flipped alike


def test_each_path_shape_is_recognised_by_its_kind(tmp_path, five_shard):
    """'' / folder / shard folder / pattern / .tar / list of images / list of shards / LMDB map to their kinds."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    (tmp_path / "imgs.txt").write_text("a.jpg\n")
    (tmp_path / "shards.txt").write_text(f"# shards\n{five_shard}\n")
    cases = {"": "synthetic", str(tmp_path / "imgs"): "folder", os.path.dirname(five_shard): "shards",
             five_shard: "shards", str(tmp_path / "s-{000..009}.tar"): "shards", str(tmp_path / "imgs.txt"): "list",
             str(tmp_path / "shards.txt"): "shards", str(tmp_path / "db"): "lmdb", str(tmp_path / "x.lmdb"): "lmdb"}
    assert {p: find_source(p).name for p in cases} == cases


def _write_images(folder, n):
    os.makedirs(folder, exist_ok=True)
    from PIL import Image
    for i in range(n):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(os.path.join(folder, f"{i}.png"))


@pytest.mark.parametrize("need,ok", [(3, True), (4, False)])
def test_folder_precheck_counts_images_at_any_depth(tmp_path, need, ok):
    """A folder of 3 images (one in a sub-folder, one behind a folder symlink) serves 3 samples, not 4."""
    _write_images(tmp_path / "d", 1)
    _write_images(tmp_path / "d" / "sub", 1)
    _write_images(tmp_path / "elsewhere", 1)
    os.symlink(tmp_path / "elsewhere", tmp_path / "d" / "link")
    cfg = DataConfig(path=str(tmp_path / "d"))
    if ok:
        assert check_data(cfg, need).name == "folder"
    else:
        with pytest.raises(ValueError, match="holds 3 images, fewer than one training step takes"):
            check_data(cfg, need)


def test_list_precheck_catches_wrong_paths_and_mixed_lists(tmp_path, five_shard):
    """A list whose files are all missing, one mixing shards and images, or a FIFO: one line each."""
    (tmp_path / "wrong.txt").write_text("nowhere/a.jpg\nnowhere/b.jpg\n")
    with pytest.raises(ValueError, match="none of the first 2 listed files exist.*list file's folder"):
        check_data(DataConfig(path=str(tmp_path / "wrong.txt")))
    (tmp_path / "mixed.txt").write_text(f"{five_shard}\n{tmp_path}/a.jpg\n")
    with pytest.raises(ValueError, match="lists .tar shards and other paths"):
        check_data(DataConfig(path=str(tmp_path / "mixed.txt")))
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(ValueError, match="is a FIFO"):  # never opened: that would block
        check_data(DataConfig(path=str(tmp_path / "pipe.txt")))


def test_shards_precheck_reads_counts_and_validation(tmp_path, five_shard):
    """Validated shards are counted from the manifest; unvalidated ones by their headers, and refused
    where validation is required (DALI, data.require_validated) with the command that validates them."""
    raw = tmp_path / "raw.tar"
    raw.write_bytes(open(five_shard, "rb").read())  # same samples, no index or manifest beside it
    with pytest.raises(ValueError, match="holds 5 images"):
        check_data(DataConfig(path=str(raw)), 6)
    assert check_data(DataConfig(path=str(raw)), 5).name == "shards"
    with pytest.raises(ValueError, match="not validated.*scan --write-index"):
        check_data(DataConfig(path=str(raw), require_validated=True))
    assert check_data(DataConfig(path=five_shard, require_validated=True), 5).name == "shards"


def test_lmdb_precheck_counts_entries_and_names_the_missing_package(tmp_path, monkeypatch):
    """An LMDB of 3 images cannot fill a step of 4; without the lmdb package the line says what to install."""
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i in range(3):
            txn.put(str(i).encode(), b"\xff\xd8 not really a jpeg")
        txn.put(b"__len__", b"3")
    env.close()
    with pytest.raises(ValueError, match="holds 3 entries, fewer"):
        check_data(DataConfig(path=str(tmp_path / "db")), 4)
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(ValueError, match="pip install lmdb"):
        check_data(DataConfig(path=str(tmp_path / "db")))


def test_dali_needs_a_kind_it_reads_and_the_package(five_shard, monkeypatch):
    """--data.loader dali on synthetic faces names the kinds DALI reads; without DALI it names the install."""
    with pytest.raises(ValueError, match="DALI reads shards only.*synthetic faces"):
        check_data(DataConfig(loader="dali"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ValueError, match="pip install nvidia-dali"):
        check_data(DataConfig(path=five_shard, loader="dali"))


def test_auto_loader_says_nothing_about_dali_on_a_cpu(five_shard, monkeypatch):
    """loader=auto on a CPU device picks torch silently, DALI installed or not; on CUDA the reason is kept."""
    from mcf_fast.data import loader as loader_mod
    from mcf_fast.data.dali import choose_backend
    said = []
    for name in ("debug", "info", "warning"):
        monkeypatch.setattr(loader_mod.log, name, lambda *a, **k: said.append(a))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as after the base install
    for path in ("", five_shard):
        loader = loader_mod.build_pretrain_loader(DataConfig(path=path, img_size=32, synthetic_size=8), batch_size=4)
        assert loader.backend == "torch"
    assert said == []
    src = open_data(DataConfig(path=five_shard))
    assert choose_backend(DataConfig(path=five_shard), src, "cpu") == ("torch", None)
    backend, note = choose_backend(DataConfig(path=five_shard), src, "cuda:0")
    assert backend == "torch" and "pip install nvidia-dali" in note
    synthetic = open_data(DataConfig(synthetic_size=8))
    assert choose_backend(DataConfig(), synthetic, "cuda:0") == ("torch", None)


BAD_DATA = [  # (argv after the common part, what the one line must say)
    (["--data.path", "/dev/zero"], "is a character device, not a data source"),
    (["--data.path", "{txt}"], "is a folder with no images"),
    (["--data.path", "{five}", "--batch-size", "32"], "holds 5 images, fewer than one training step takes (32"),
    (["--data.synthetic_size", "5", "--batch-size", "32"], "--data.synthetic_size 5: one training step takes 32"),
]


@pytest.mark.parametrize("argv,needle", BAD_DATA, ids=[a[1] if len(a) > 1 else a[0] for a, _ in BAD_DATA])
def test_bad_data_is_one_line_before_anything_is_written(argv, needle, tmp_path, five_shard, capsys):
    """Each bad data value: exit 2, one line naming it and the fix, and no run folder (no config.json, no lock)."""
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(3):
        (txt / f"{i}.txt").write_text("not an image")
    argv = [a.format(txt=txt, five=five_shard) for a in argv]
    out = tmp_path / "run"
    line = _fail(["--out", str(out), *argv], capsys)
    assert needle in line, line
    assert not out.exists()


def test_the_real_command_refuses_dev_zero_in_one_line(tmp_path):
    """`python -m mcf_fast.pretrain --data.path /dev/zero` (its main, run here as the interpreter would):
    exit 2, one stderr line, nothing written."""
    from runners import main_here
    out = tmp_path / "run"
    rc, err = main_here(pretrain.main, ["--data.path", "/dev/zero", "--out", str(out)])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "character device" in err and not out.exists()


def test_the_data_page_documents_every_kind_and_reason():
    """docs/data.md names every registered source and detector, and holds reasons.py's table row for row."""
    from mcf_fast.data.detectors import DETECTORS
    from mcf_fast.data.reasons import table_markdown
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "data.md")) as f:
        page = f.read()
    for entry in list(SOURCES) + list(DETECTORS):
        assert f"| `{entry.name}` |" in page, entry.name
    assert table_markdown() in page
