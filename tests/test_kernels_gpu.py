"""The Triton kernels on a real GPU at MCF's sizes, against the references (skipped without CUDA)."""
import mcf_fast.kernels as K
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    K.set_backend("auto")
    yield
    K.reset_backend()


def _three_way(ours, lowp, ref64, what, rel_atol):
    ours, lowp = ours.double(), lowp.double()
    atol = rel_atol * (ref64.abs().max().item() + 1e-30)
    err, bound = (ours - ref64).abs(), 2 * (lowp - ref64).abs() + atol
    assert bool((err <= bound).all()), f"{what}: worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dts", [(BF16, F32, F32), (BF16, BF16, BF16), (F32, F32, F32)],
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=str)
def test_gather_visible_cuda(dts, idx_dtype):
    """Triton gather: output and d x bit-exact vs the reference; d pos, d cls within the three-way bound."""
    N, L, D, k = 64, 196, 768, 49
    dev = "cuda"
    ids = torch.rand(N, L, device=dev).argsort(1)[:, :k].to(idx_dtype)
    x = torch.randn(N, L, D, device=dev, dtype=dts[0], requires_grad=True)
    pos = torch.randn(1 + L, D, device=dev, dtype=dts[1], requires_grad=True)
    cls = torch.randn(1, 1, D, device=dev, dtype=dts[2], requires_grad=True)
    out, ref = K.gather_visible(x, ids, pos, cls), K.gather_visible_ref(x, ids, pos, cls)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    a, b = torch.autograd.grad(out, (x, pos, cls), g), torch.autograd.grad(ref, (x, pos, cls), g)
    assert torch.equal(a[0], b[0])
    l64 = [t.detach().double().requires_grad_(True) for t in (x, pos, cls)]
    r64 = torch.autograd.grad(K.gather_visible_ref(l64[0], ids, l64[1], l64[2]), l64, g.double())
    _three_way(a[1], b[1], r64[1], "d pos", 1e-6)
    _three_way(a[2], b[2], r64[2], "d cls", 1e-6)


@pytest.mark.parametrize("dts", [(BF16, F32, F32), (BF16, BF16, BF16), (F32, F32, F32)],
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_scatter_to_full_cuda(dts):
    """Triton scatter: output and d tokens bit-exact; d mask_token, d pos within the three-way bound."""
    N, L, Dd, k = 64, 196, 512, 49
    dev = "cuda"
    restore = torch.rand(N, L, device=dev).argsort(1).argsort(1)
    t = torch.randn(N, 1 + k, Dd, device=dev, dtype=dts[0], requires_grad=True)
    m = torch.randn(1, 1, Dd, device=dev, dtype=dts[2], requires_grad=True)
    pos = torch.randn(1 + L, Dd, device=dev, dtype=dts[1], requires_grad=True)
    out, ref = K.scatter_to_full(t, restore, m, pos), K.scatter_to_full_ref(t, restore, m, pos)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    a, b = torch.autograd.grad(out, (t, m, pos), g), torch.autograd.grad(ref, (t, m, pos), g)
    assert torch.equal(a[0], b[0])
    l64 = [u.detach().double().requires_grad_(True) for u in (t, m, pos)]
    r64 = torch.autograd.grad(K.scatter_to_full_ref(l64[0], restore, l64[1], l64[2]), l64, g.double())
    _three_way(a[1], b[1], r64[1], "d mask_token", 1e-6)
    _three_way(a[2], b[2], r64[2], "d pos", 1e-6)


@pytest.mark.parametrize("dtype", [BF16, torch.float16, F32], ids=str)
@pytest.mark.parametrize("N,M,off", [(512, 1024, 512), (1000, 1000, 0), (1, 37, 5)])
def test_info_nce_cuda(dtype, N, M, off):
    """Triton InfoNCE: loss, d q, d k within the three-way bound of the reference (C = 256)."""
    C = 256
    q0, k0 = torch.randn(N, C, device="cuda"), torch.randn(M, C, device="cuda")
    gup = torch.tensor(0.7, device="cuda")

    def run(fn, q, k):
        q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        loss = fn(q, k, 0.2, off, 0.4)
        return [loss, *torch.autograd.grad(loss, (q, k), gup.to(loss.dtype))]

    ours = run(K.info_nce, q0.to(dtype), k0.to(dtype))
    lowp = run(K.info_nce_ref, q0.to(dtype), k0.to(dtype))
    r64 = run(K.info_nce_ref, q0.double(), k0.double())
    rel = 1e-5 if dtype == F32 else 2e-3
    for o, lp, r, name in zip(ours, lowp, r64, ("loss", "d q", "d k")):
        _three_way(o, lp, r, name, rel)


def _truncate_bf16(t):
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(BF16)


def test_bf16_narrowing_rounds_to_nearest_cuda():
    """Compiled Triton narrows fp32 gradients to bf16 rounding to nearest even: bit-exact vs the reference.

    The interpreter truncates instead (tests/test_kernels_interpret.py), so bf16 exactness of the
    narrowing stores is proven here only: un-shuffle backward (bf16 tokens, fp32 pos and mask token)
    and gather backward (bf16 x, fp32 pos), with a check that truncation would have been caught.
    """
    N, L, D, k = 16, 196, 512, 49
    restore = torch.rand(N, L, device="cuda").argsort(1).argsort(1)
    t = torch.randn(N, 1 + k, D, device="cuda", dtype=BF16, requires_grad=True)
    m = torch.randn(D, device="cuda", requires_grad=True)
    pos = torch.randn(1 + L, D, device="cuda", requires_grad=True)
    out, ref = K.scatter_to_full(t, restore, m, pos), K.scatter_to_full_ref(t, restore, m, pos)
    g = torch.randn_like(ref)
    (a,), (b,) = torch.autograd.grad(out, t, g), torch.autograd.grad(ref, t, g)
    assert torch.equal(a, b)
    t32 = t.detach().float().requires_grad_(True)
    (exact,) = torch.autograd.grad(K.scatter_to_full_ref(t32, restore, m, pos), t32, g)
    assert not torch.equal(a, _truncate_bf16(exact))  # this gradient tells the two modes apart
    ids = torch.rand(N, L, device="cuda").argsort(1)[:, :k]
    x = torch.randn(N, L, D, device="cuda", dtype=BF16, requires_grad=True)
    out, ref = K.gather_visible(x, ids, pos), K.gather_visible_ref(x, ids, pos)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_gather_int64_offsets_beyond_2_31():
    """x and d x with more than 2^31 elements: the last sample's rows are right both ways (int64 offsets)."""
    N, L, D, k = 14300, 196, 768, 49  # 2.15e9 elements, 4.3 GB in bf16
    x = torch.zeros(N, L, D, device="cuda", dtype=BF16)
    x[-1].normal_()
    x.requires_grad_(True)
    ids = torch.rand(N, L, device="cuda").argsort(1)[:, :k]
    pos = torch.randn(1 + L, D, device="cuda", dtype=BF16)
    out = K.gather_visible(x, ids, pos, torch.zeros(D, device="cuda", dtype=BF16))
    assert torch.equal(out[-1, 1:], x[-1, ids[-1]] + pos[1 + ids[-1]])
    g = torch.zeros_like(out)
    g[-1].normal_()
    (gx,) = torch.autograd.grad(out, x, g)
    want = torch.zeros(L, D, device="cuda", dtype=BF16)
    want[ids[-1]] = g[-1, 1:]
    assert torch.equal(gx[-1], want) and not gx[:-1].any()


def test_inductor_fullgraph_cuda():
    """torch.compile (inductor, fullgraph) runs the ops on CUDA and matches eager."""
    N, L, D = 8, 196, 768
    ids = torch.rand(N, L, device="cuda").argsort(1)[:, :49]
    x = torch.randn(N, L, D, device="cuda", dtype=BF16, requires_grad=True)
    pos = torch.randn(1 + L, D, device="cuda")
    f = torch.compile(lambda x: K.gather_visible(x, ids, pos).square().sum(), fullgraph=True)
    (g1,) = torch.autograd.grad(f(x), x)
    (g2,) = torch.autograd.grad(K.gather_visible(x, ids, pos).square().sum(), x)
    assert torch.equal(g1, g2)
