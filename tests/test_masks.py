"""mcf_fast.masking: exactness (C++ == torch mirror == scalar reference), conventions, invariance,
bad input, torch.compile. Statistics live in test_masks_uniformity.py, build checks in
test_masks_build.py."""
import hashlib
import os
import sys

import background
import pytest
import torch

from mcf_fast import mask_algo as algo
from mcf_fast import masking as mk

if os.environ.get("MCF_FAST_REQUIRE_EXT", "0") == "1":  # CI: a missing extension fails, never skips
    from mcf_fast import _C as ext
else:
    ext = pytest.importorskip("mcf_fast._C", reason="mcf_fast._C not built: pip install -v --no-build-isolation -e .")
OP = torch.ops.mcf_fast.random_masks
M32 = 0xFFFFFFFF


# ------------------------------------------------------------ scalar reference (plain Python ints)
def _philox_py(ctr, key):
    c, k0, k1 = list(ctr), key[0], key[1]
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return c


def _row_py(L, K, seed, step, sid, view):
    """One row by the documented algorithm, written independently of csrc/ and masking.py.

    Returns (keep, restore, mask, rejections)."""
    ctr = [0, (view << 16) | ((sid >> 32) & 0xFFFF), sid & M32, step]
    key = (seed & M32, seed >> 32)
    d, rejections = 0, 0

    def draw():
        nonlocal d
        x = _philox_py([d // 4] + ctr[1:], key)[d % 4]
        d += 1
        return x

    M = min(K, L - K)
    perm = list(range(L))
    for i in range(M):
        rng = L - i
        while True:
            m = draw() * rng
            if (m & M32) >= (2**32 - rng) % rng:
                break
            rejections += 1
        j = i + (m >> 32)
        perm[i], perm[j] = perm[j], perm[i]
    chosen = set(perm[:M])
    kept = [(l in chosen) == (K <= L - K) for l in range(L)]
    keep = [l for l in range(L) if kept[l]]
    removed = [l for l in range(L) if not kept[l]]
    shuffle = keep + removed
    restore = [0] * L
    for pos, l in enumerate(shuffle):
        restore[l] = pos
    return keep, restore, [not k for k in kept], rejections


def _check_structure(m, L, K):
    V, N = m.mask.shape[:2]
    assert m.ids_keep.shape == (V, N, K) and m.ids_keep.dtype == torch.int64
    assert m.ids_restore.shape == (V, N, L) and m.ids_restore.dtype == torch.int64
    assert m.mask.shape == (V, N, L) and m.mask.dtype == torch.bool
    keep = m.ids_keep.reshape(-1, K)
    restore = m.ids_restore.reshape(-1, L)
    mask = m.mask.reshape(-1, L)
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "ids_keep must be strictly ascending"
    removed = mask.nonzero()[:, 1].reshape(mask.shape[0], L - K)  # row-major: ascending
    shuffle = torch.cat([keep, removed], dim=1)
    assert torch.equal(torch.argsort(shuffle, dim=1), restore)  # MAE's definition
    assert torch.equal(mask, restore >= K)
    assert torch.equal(mask.sum(1), torch.full((mask.shape[0],), L - K))


# --------------------------------------------------------------------------------- exactness
def test_philox_known_answers():
    """The torch Philox mirror reproduces Random123's published Philox4x32-10 vectors."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = algo.philox4x32_10(*[torch.tensor(c) for c in ctr], *key)
        assert tuple(int(g) for g in got) == want
        assert tuple(_philox_py(ctr, key)) == want


SHAPES = [  # (N, L, ratio, views): real shapes, awkward ones, both selection sides
    (8, 196, 0.75, 2), (4, 197, 0.9, 2), (6, 196, 0.5, 1), (5, 16, 0.25, 3), (1, 784, 0.75, 2),
    (7, 10, 0.0, 2), (3, 1, 0.0, 1), (2, 49, 0.97, 2), (0, 196, 0.75, 2), (3, 64, 0.4, 1),
]


@pytest.mark.parametrize("N,L,ratio,V", SHAPES)
def test_extension_equals_torch_mirror(N, L, ratio, V):
    """C++ op and pure-torch fallback give the same bits, and the outputs keep MAE's conventions."""
    ids = torch.arange(N, dtype=torch.int64) * 1_000_003 + (2**47 - 5)
    K = mk.num_kept(L, ratio)
    for seed, step in [(0, 0), (2**64 - 1, 2**32 - 1), (12345, 678)]:
        a = mk.random_masks(N, L, ratio, views=V, seed=seed, step=step, sample_ids=ids, backend="ext")
        b = mk.random_masks(N, L, ratio, views=V, seed=seed, step=step, sample_ids=ids, backend="torch")
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        _check_structure(a, L, K)


def test_scalar_reference_rows_and_rejection_path():
    """Rows equal an independent scalar implementation, including a row whose draws hit Lemire's
    rejection (found by search, so the redraw path of C++ and torch is exercised)."""
    L, K, seed, step = 4096, 2048, 7, 3
    # First rejection of a row: the earliest draw i with low(x_i * (L - i)) < 2^32 mod (L - i),
    # before any redraw has shifted the stream. Scan sample ids until one row rejects (the scan
    # from 0 first hits in [1000, 1500) for this seed; starting there saves 3 s, the check stays).
    ranges = torch.arange(L, L - K, -1, dtype=torch.int64)
    thresholds = (2**32 - ranges) % ranges
    found = None
    for start in range(1000, 20_000, 500):
        sids = torch.arange(start, start + 500, dtype=torch.int64)
        s = algo.RowStreams(sids, 1, seed, step).prefetch(K)
        low = (s.first[:, :K] * ranges) & M32
        hit = (low < thresholds).any(1)
        if bool(hit.any()):
            found = int(sids[hit.nonzero()[0, 0]])
            break
    assert found is not None, "no rejecting row in 20k rows: expected ~1 per 1.5k"
    ids = torch.tensor([found, found + 1, 5], dtype=torch.int64)
    a = mk.random_masks(3, L, 0.5, views=1, seed=seed, step=step, sample_ids=ids, backend="ext")
    b = mk.random_masks(3, L, 0.5, views=1, seed=seed, step=step, sample_ids=ids, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    keep, restore, mask, rejections = _row_py(L, K, seed, step, found, 0)
    assert rejections >= 1
    assert a.ids_keep[0, 0].tolist() == keep
    assert a.ids_restore[0, 0].tolist() == restore
    assert a.mask[0, 0].tolist() == mask


@pytest.mark.parametrize("L,ratio,view", [(196, 0.75, 0), (196, 0.75, 1), (16, 0.25, 2), (10, 0.0, 0)])
def test_scalar_reference_small(L, ratio, view):
    """Small rows equal the scalar reference (counter layout, key split, selection side)."""
    seed, step, sid = 2**63 + 11, 2**32 - 2, 2**48 - 3
    K = mk.num_kept(L, ratio)
    keep, restore, mask, _ = _row_py(L, K, seed, step, sid, view)
    m = mk.random_masks(1, L, ratio, views=view + 1, seed=seed, step=step,
                        sample_ids=torch.tensor([sid]))
    assert m.ids_keep[view, 0].tolist() == keep
    assert m.ids_restore[view, 0].tolist() == restore
    assert m.mask[view, 0].tolist() == mask


def test_mae_recipe_on_derived_noise_reproduces_masks():
    """MAE's argsort recipe fed noise = ids_restore gives exactly our three outputs."""
    N, L, ratio = 16, 196, 0.75
    K = mk.num_kept(L, ratio)
    m = mk.random_masks(N, L, ratio, seed=3)
    noise = m.ids_restore[0].float()
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, restore)
    assert torch.equal(shuffle[:, :K], m.ids_keep[0])
    assert torch.equal(restore, m.ids_restore[0])
    assert torch.equal(mask.bool(), m.mask[0])


# --------------------------------------------------------------------------------- invariance
def test_thread_count_invariance():
    """1, 2 and 4 OpenMP threads give identical masks (a size above the serial cut-off)."""
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append(mk.random_masks(1024, 196, 0.75, views=2, seed=9, step=1))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert torch.equal(x, y)


THREE_THREADS = ("import torch, hashlib; from mcf_fast.masking import random_masks as r; "
                 "torch.set_num_threads(3); "
                 "m = r(1024, 784, 0.75, views=2, seed=1, step=2); "
                 "print(torch.get_num_threads(), "
                 "hashlib.sha256(b''.join(t.numpy().tobytes() for t in m)).hexdigest())")


def start_background(items) -> None:
    """Called by conftest once the session's tests are known: the 3-thread process is queued in the
    background (tests/background.py); its test runs last."""
    if items is None or any(i.name == "test_thread_count_invariance_subprocess" for i in items):
        env = dict(os.environ, OMP_NUM_THREADS="3")
        background.start("masks_three_threads", background.run, [sys.executable, "-c", THREE_THREADS], 600, env,
                         cost=2)


@pytest.mark.late
def test_thread_count_invariance_subprocess():
    """3 OpenMP threads in a fresh process (started in the background with the session) give the bytes this
    process makes."""
    start_background(None)  # (already started by conftest)
    out = background.result("masks_three_threads")
    assert out.returncode == 0, out.stderr
    threads, digest = out.stdout.split()
    assert threads == "3"
    m = mk.random_masks(1024, 784, 0.75, views=2, seed=1, step=2)
    assert digest == hashlib.sha256(b"".join(t.numpy().tobytes() for t in m)).hexdigest()


def test_batch_split_and_permutation_invariance():
    """A row depends on its sample id only: split and permuted batches give the same rows."""
    ids = torch.arange(100, 140, dtype=torch.int64)
    full = mk.random_masks(40, 196, 0.75, views=2, seed=4, step=5, sample_ids=ids)
    a = mk.random_masks(15, 196, 0.75, views=2, seed=4, step=5, sample_ids=ids[:15])
    b = mk.random_masks(25, 196, 0.75, views=2, seed=4, step=5, sample_ids=ids[15:])
    for f, x, y in zip(full, a, b):
        assert torch.equal(f, torch.cat([x, y], dim=1))
    perm = torch.randperm(40)
    p = mk.random_masks(40, 196, 0.75, views=2, seed=4, step=5, sample_ids=ids[perm])
    for f, x in zip(full, p):
        assert torch.equal(f[:, perm], x)


def test_views_are_prefix_stable_and_distinct():
    """View v is the same in any call with more views; views, steps, seeds give different masks."""
    one = mk.random_masks(32, 196, 0.75, views=1, seed=1, step=2)
    three = mk.random_masks(32, 196, 0.75, views=3, seed=1, step=2)
    for x, y in zip(one, three):
        assert torch.equal(x[0], y[0])
    assert not torch.equal(three.mask[0], three.mask[1])
    assert not torch.equal(three.mask[1], three.mask[2])
    assert not torch.equal(one.mask, mk.random_masks(32, 196, 0.75, seed=1, step=3).mask)
    assert not torch.equal(one.mask, mk.random_masks(32, 196, 0.75, seed=2, step=2).mask)


# --------------------------------------------------------------------------------- bad input
BAD = [
    ({"mask_ratio": 1.0}, ValueError, "mask_ratio must be in"),
    ({"mask_ratio": -0.1}, ValueError, "mask_ratio must be in"),
    ({"mask_ratio": float("nan")}, ValueError, "mask_ratio must be in"),
    ({"mask_ratio": 0.999}, ValueError, "at least one patch is kept"),
    ({"batch_size": -1}, ValueError, "batch_size must be in"),
    ({"num_patches": 0}, ValueError, "num_patches must be in"),
    ({"num_patches": 2**31}, ValueError, "num_patches must be in"),
    ({"views": 0}, ValueError, "views must be in"),
    ({"views": 2**16 + 1}, ValueError, "views must be in"),
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"seed": 2**64}, ValueError, "seed must be in"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"step": -1}, ValueError, "step must be in"),
    ({"step": 2**32}, ValueError, "step must be in"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"sample_ids": torch.arange(3)}, ValueError, "shape"),
    ({"sample_ids": torch.arange(4).float()}, TypeError, "int64"),
    ({"sample_ids": [0, 1, 2, 3]}, TypeError, "1-D int64 tensor"),
    ({"sample_ids": torch.tensor([0, 1, -2, 3])}, ValueError, r"\[0, 2\^48\)"),
    ({"sample_ids": torch.tensor([0, 1, 2**48, 3])}, ValueError, r"\[0, 2\^48\)"),
    ({"device": "gpu"}, ValueError, "not a device"),
    ({"device": "meta"}, ValueError, "not supported"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_errors(kwargs, exc, msg):
    """Every bad argument raises a clear error naming it (and nothing is generated)."""
    args = {"batch_size": 4, "num_patches": 196, "mask_ratio": 0.75, "seed": 0}
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        mk.random_masks(args.pop("batch_size"), args.pop("num_patches"), args.pop("mask_ratio"),
                        **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_errors():
    """Asking for CUDA on a machine without it says so and names the fix."""
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        mk.random_masks(4, 196, 0.75, seed=0, device="cuda")


@pytest.mark.parametrize("args,msg", [
    ((torch.arange(4), 196, 0, 1, 0, 0), "num_keep"),
    ((torch.arange(4), 196, 197, 1, 0, 0), "num_keep"),
    ((torch.arange(4), 2**31, 5, 1, 0, 0), "num_patches"),
    ((torch.arange(4), 196, 49, 0, 0, 0), "views"),
    ((torch.arange(4), 196, 49, 1, 0, -1), "step"),
    ((torch.arange(4).float(), 196, 49, 1, 0, 0), "int64"),
    ((torch.arange(8).view(2, 4), 196, 49, 1, 0, 0), "1-D"),
    ((torch.tensor([-1]), 196, 49, 1, 0, 0), "sample_ids"),
])
def test_op_checks_its_arguments(args, msg):
    """The raw C++ op refuses bad sizes itself (no out-of-bounds write if Python is bypassed)."""
    with pytest.raises(RuntimeError, match=msg):
        OP(*args)


# --------------------------------------------------------------------------------- compile
def test_meta_kernel_shapes():
    """The Meta kernel gives shapes and dtypes without data (what FakeTensor and compile use)."""
    k, r, m = OP(torch.empty(6, dtype=torch.int64, device="meta"), 196, 49, 2, 0, 0)
    assert (k.shape, r.shape, m.shape) == ((2, 6, 49), (2, 6, 196), (2, 6, 196))
    assert (k.dtype, r.dtype, m.dtype) == (torch.int64, torch.int64, torch.bool)
    assert k.device.type == "meta"


def test_torch_compile_fullgraph_matches_eager():
    """random_masks traces under torch.compile(fullgraph=True), also with a changing step."""
    torch._dynamo.reset()

    def f(ids, step):
        m = mk.random_masks(ids.shape[0], 196, 0.75, views=2, seed=5, step=step, sample_ids=ids)
        return m.ids_keep + 1, m.ids_restore, m.mask

    from torch._dynamo.utils import counters

    counters.clear()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    ids = torch.arange(8, dtype=torch.int64)
    for step in (0, 1, 2, 3):
        for x, y in zip(cf(ids, step), f(ids, step)):
            assert torch.equal(x, y)
    # static first graph, then one with a symbolic step: no recompile per step
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("N,L,ratio,V", SHAPES + [(3, 8192, 0.5, 2), (2, 4096, 0.5, 1)])
def test_cuda_equals_cpu(N, L, ratio, V):
    """The CUDA kernel (shared-memory and workspace paths) gives the CPU bits."""
    if not getattr(ext, "WITH_CUDA", 0):
        if os.environ.get("MCF_FAST_REQUIRE_EXT", "0") == "1":
            pytest.fail("mcf_fast._C was built without CUDA on a CUDA machine under MCF_FAST_REQUIRE_EXT=1")
        pytest.skip("mcf_fast._C built without CUDA")
    ids = torch.arange(N, dtype=torch.int64) * 7919 + 3
    for seed, step in [(0, 0), (2**64 - 1, 2**32 - 1)]:
        c = mk.random_masks(N, L, ratio, views=V, seed=seed, step=step, sample_ids=ids)
        g = mk.random_masks(N, L, ratio, views=V, seed=seed, step=step, sample_ids=ids.cuda(),
                            device="cuda")
        for x, y in zip(c, g):
            assert y.is_cuda and torch.equal(x, y.cpu())
