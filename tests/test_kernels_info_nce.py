"""info_nce: the blocked CPU path against the reference (three-way bound), label offsets, compile, memory.

The Triton kernels are checked under the interpreter in test_kernels_interpret.py and compiled for
sm_90 in test_kernels_aot.py.
"""
import importlib
import sys

import mcf_fast.kernels as K
import pytest
import torch

# the package re-exports the function `info_nce`, which shadows the module of the same name
nce_mod = importlib.import_module("mcf_fast.kernels.info_nce")


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    K.reset_backend()


def three_way(ours, lowp, ref64, what, rel_atol, unit):
    """|ours - ref64| <= 2 |ref_lowp - ref64| + atol, elementwise (STYLE.md).

    atol is rel_atol times the quantity's natural size: its largest entry, or `unit` (the size of
    one term, e.g. scale / (T N) for a gradient) where the exact answer is 0 (N = M = 1).
    """
    ours, lowp = ours.double(), lowp.double()
    atol = rel_atol * max(ref64.abs().max().item(), unit)
    err, bound = (ours - ref64).abs(), 2 * (lowp - ref64).abs() + atol
    assert bool((err <= bound).all()), f"{what}: worst excess {(err - bound).max().item():.3g} (atol {atol:.3g})"


def _run(fn, q, k, T, off, scale, gup):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(k.requires_grad)
    loss = fn(q, k, T, off, scale)
    leaves = [q] + ([k] if k.requires_grad else [])
    return [loss] + list(torch.autograd.grad(loss, leaves, gup.to(loss.dtype)))


# (N, M, C, label_offset): N = 1, square, multi-rank gather (M = 3N, rank 1), odd C, C = 256
# last field: CPU block budget in logits elements (64 -> blocks of one or two rows)
SHAPES = [(1, 1, 8, 0, 1 << 21), (1, 5, 16, 3, 1 << 21), (7, 7, 256, 0, 1 << 21), (16, 48, 64, 16, 64),
          (33, 100, 123, 40, 64), (33, 100, 123, 40, 1 << 21), (64, 64, 256, 0, 1 << 21)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k_grad", [False, True])
def test_info_nce_cpu_three_way(shape, dtype, k_grad, monkeypatch):
    """Loss, d q and d k of the blocked CPU path vs the reference in fp64 and in the input dtype."""
    N, M, C, off, block_elems = shape
    monkeypatch.setattr(nce_mod, "_CPU_BLOCK_ELEMS", block_elems)
    q = torch.randn(N, C).to(dtype)
    k = torch.randn(M, C).to(dtype).requires_grad_(k_grad)
    T, scale = 0.2, 0.4
    gup = torch.tensor(0.5 + torch.rand(()).item())
    K.set_backend("cpu")
    ours = _run(K.info_nce, q, k, T, off, scale, gup)
    lowp = _run(K.info_nce_ref, q, k, T, off, scale, gup)
    ref64 = _run(K.info_nce_ref, q.double(), k.double().requires_grad_(k_grad), T, off, scale, gup.double())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    rel = 2e-6 if dtype == torch.float32 else 1e-3
    for o, lp, r, name, unit in zip(ours, lowp, ref64, ("loss", "d q", "d k"),
                                    (scale, scale / (T * N), scale / (T * N))):
        three_way(o, lp, r, name, rel, unit)


def test_info_nce_defaults_and_errors():
    """scale defaults to 1 and temperature enters as 1/T; bad offsets and tensor temperatures are refused."""
    q, k = torch.randn(4, 8), torch.randn(8, 8)
    K.set_backend("cpu")
    a = K.info_nce(q, k, 0.5)
    assert torch.allclose(a, K.info_nce_ref(q, k, 0.5).float(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(K.info_nce(q, k, 0.5, scale=3.0), 3 * a, rtol=1e-6)
    with pytest.raises(ValueError, match="label_offset"):
        K.info_nce(q, k, 0.5, label_offset=5)
    with pytest.raises(ValueError, match="host sync"):
        K.info_nce(q, k, torch.tensor(0.5))
    with pytest.raises(ValueError, match="C=8 features"):
        K.info_nce(q, torch.randn(8, 9), 0.5)
    with torch.no_grad():  # no graph: no gradients computed or kept
        assert K.info_nce(q, k, 0.5).grad_fn is None


def test_info_nce_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces info_nce forward and backward (CPU, aot_eager)."""
    K.set_backend("cpu")
    q = torch.randn(6, 16, requires_grad=True)
    k = torch.randn(12, 16, requires_grad=True)
    f = torch.compile(lambda q, k: K.info_nce(q, k, 0.2, label_offset=6, scale=0.4), fullgraph=True,
                      backend="aot_eager")
    loss = f(q, k)
    gq, gk = torch.autograd.grad(loss, (q, k))
    ref = K.info_nce_ref(q, k, 0.2, 6, 0.4)
    rq, rk = torch.autograd.grad(ref, (q, k))
    assert torch.allclose(loss, ref, rtol=1e-6) and torch.allclose(gq, rq, atol=1e-7) and torch.allclose(gk, rk, atol=1e-7)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS read from /proc/self/status")
def test_info_nce_peak_memory_quarter_of_naive(fresh_child):
    """N = M = 8192, C = 256, fwd+bwd on CPU: peak RSS above the inputs < 1/4 of the naive logits path.
    Measured in a fresh interpreter (conftest's `fresh_child`: tests/fresh_child.py's nce_memory)."""
    assert fresh_child["rc"] == 0, fresh_child["stderr"]
    res = fresh_child["nce_memory"]
    assert "failed" not in res, res
    naive, ours = res["naive"], res["ours"]
    print(f"\npeak above inputs: naive {naive['peak'] / 2**20:.0f} MiB, info_nce {ours['peak'] / 2**20:.0f} MiB")
    assert abs(naive["loss"] - ours["loss"]) <= 1e-4 * abs(naive["loss"])
    assert abs(naive["g"] - ours["g"]) <= 1e-4 * naive["g"]
    # the naive path holds at least the [N, M] fp32 logits: a measurement far below that is broken
    assert naive["peak"] >= 8192 * 8192 * 4
    assert ours["peak"] * 4 < naive["peak"], (ours["peak"], naive["peak"])
