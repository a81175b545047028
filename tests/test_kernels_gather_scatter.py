"""gather_visible / scatter_to_full: every CPU-side path against the reference, forward and backward.

Data movement (outputs, d x, d tokens) must be bit-exact (torch.equal); the reductions (d pos,
d cls, d mask_token) use the three-way bound against an fp64 reference. The Triton kernels are
checked under the interpreter in test_kernels_interpret.py and compiled for sm_90 in
test_kernels_aot.py.
"""
import mcf_fast.kernels as K
import pytest
import torch
from mcf_fast.kernels import backend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    K.reset_backend()


def _ids(N, L, ratio, dtype=torch.int64):
    shuffle = torch.rand(N, L).argsort(1)
    k = int(L * (1 - ratio))
    return shuffle[:, :k].to(dtype), shuffle.argsort(1).to(dtype)


def three_way(ours, lowp, ref64, what, rel_atol=1e-6):
    """|ours - ref64| <= 2 |ref_lowp - ref64| + atol, elementwise (STYLE.md)."""
    ours, lowp = ours.double(), lowp.double()
    atol = rel_atol * (ref64.abs().max().item() + 1.0)
    err, bound = (ours - ref64).abs(), 2 * (lowp - ref64).abs() + atol
    assert bool((err <= bound).all()), f"{what}: worst excess {(err - bound).max().item():.3g}"


def _grads(out, inputs, g):
    want = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, want, g)


# (N, L, D, ratio): real shapes, N = 1, K = L (ratio 0), odd D, L = 197
SHAPES = [(2, 196, 64, 0.75), (1, 197, 123, 0.5), (3, 16, 8, 0.0), (2, 49, 384, 0.9), (2, 196, 768, 0.75)]
# (x, pos, cls) dtypes: same dtype, autocast-like (bf16 x, fp32 parameters), a CLS wider than x + pos
DTYPES = [(F32, F32, F32), (BF16, BF16, BF16), (F16, F16, F16), (BF16, F32, F32), (BF16, BF16, F32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dts", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("variant", ["pos1L+cls", "posL", "plain", "cls-only"])
def test_gather_visible_cpu_matches_reference(shape, dts, variant):
    """Fast CPU path: output and d x bit-exact, d pos / d cls within the three-way bound."""
    N, L, D, ratio = shape
    ids, _ = _ids(N, L, ratio, torch.int32 if variant == "posL" else torch.int64)
    x = torch.randn(N, L, D, dtype=dts[0], requires_grad=True)
    pos = None if variant in ("plain", "cls-only") else \
        torch.randn(L + (variant == "pos1L+cls"), D, dtype=dts[1], requires_grad=True)
    cls = torch.randn(1, 1, D, dtype=dts[2], requires_grad=True) if "cls" in variant else None
    K.set_backend("cpu")
    out = K.gather_visible(x, ids, pos, cls)
    ref = K.gather_visible_ref(x, ids, pos, cls)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    ours, lowp = _grads(out, (x, pos, cls), g), _grads(ref, (x, pos, cls), g)
    assert torch.equal(ours[0], lowp[0])  # d x: pure data movement
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, pos, cls)]
    ref64 = _grads(K.gather_visible_ref(leaves64[0], ids, leaves64[1], leaves64[2]), leaves64, g.double())
    for i, name in ((1, "d pos"), (2, "d cls")):
        if pos is None and i == 1:
            continue
        j = i if pos is not None else i - 1
        if j < len(ours):
            assert ours[j].dtype == lowp[j].dtype
            three_way(ours[j], lowp[j], ref64[j], name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dts", DTYPES[:4], ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("with_pos", [True, False])
def test_scatter_to_full_cpu_matches_reference(shape, dts, with_pos):
    """Fast CPU path: output and d tokens bit-exact, d mask_token / d pos within the three-way bound."""
    N, L, Dd, ratio = shape
    _, restore = _ids(N, L, ratio)
    k = int(L * (1 - ratio))
    t = torch.randn(N, 1 + k, Dd, dtype=dts[0], requires_grad=True)
    m = torch.randn(Dd, dtype=dts[2], requires_grad=True)
    pos = torch.randn(1 + L, Dd, dtype=dts[1], requires_grad=True) if with_pos else None
    K.set_backend("cpu")
    out = K.scatter_to_full(t, restore, m, pos)
    ref = K.scatter_to_full_ref(t, restore, m, pos)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    g = torch.randn_like(ref)
    ins = (t, m, pos)
    ours, lowp = _grads(out, ins, g), _grads(ref, ins, g)
    assert torch.equal(ours[0], lowp[0])
    l64 = [u.detach().double().requires_grad_(True) if u is not None else None for u in ins]
    ref64 = _grads(K.scatter_to_full_ref(l64[0], restore, l64[1], l64[2]), l64, g.double())
    for j in range(1, len(ours)):
        assert ours[j].dtype == lowp[j].dtype
        three_way(ours[j], lowp[j], ref64[j], ("d mask_token", "d pos")[j - 1])


def test_gather_and_scatter_are_adjoint():
    """<gather(x), y> == <x, gather^T(y)>: the two ops' backward passes are each other's forward."""
    N, L, D = 3, 20, 16
    ids, restore = _ids(N, L, 0.75)
    x = torch.randn(N, L, D, dtype=torch.float64, requires_grad=True)
    K.set_backend("cpu")
    y = torch.randn(N, ids.shape[1], D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(K.gather_visible(x, ids), x, y)
    lhs = (K.gather_visible(x, ids) * y).sum()
    assert torch.allclose(lhs, (x * gx).sum(), rtol=1e-12, atol=0)
    # scatter of [zero CLS, y] with a zero mask token is exactly d x of the gather (ids restore order)
    tok = torch.cat([torch.zeros(N, 1, D, dtype=torch.float64), y], 1)
    full = K.scatter_to_full(tok, restore, torch.zeros(D, dtype=torch.float64))
    assert torch.equal(full[:, 1:], gx)


def test_reference_backend_and_bad_inputs():
    """MCF_FAST_KERNELS=reference routes to *_ref; malformed inputs raise errors that name the fix."""
    N, L, D = 2, 10, 4
    ids, restore = _ids(N, L, 0.5)
    x = torch.randn(N, L, D)
    K.set_backend("reference")
    assert torch.equal(K.gather_visible(x, ids), K.gather_visible_ref(x, ids))
    K.set_backend("cpu")
    with pytest.raises(ValueError, match=r"x must be \[N, L, D\]"):
        K.gather_visible(x[0], ids)
    with pytest.raises(ValueError, match="int32 or int64"):
        K.gather_visible(x, ids.float())
    with pytest.raises(ValueError, match="pos_embed"):
        K.gather_visible(x, ids, pos=torch.randn(1, L + 1, D))
    with pytest.raises(ValueError, match="cls must be"):
        K.gather_visible(x, ids, cls=torch.randn(D + 1))
    with pytest.raises(ValueError, match="rows but the batch"):
        K.gather_visible(x, ids[:1])
    with pytest.raises(ValueError, match="mask_token must be"):
        K.scatter_to_full(torch.randn(N, 6, D), restore, torch.randn(D, 2))
    with pytest.raises(ValueError, match="K <= L"):
        K.scatter_to_full(torch.randn(N, L + 2, D), restore, torch.randn(D))


def test_backend_choice_and_refusals(monkeypatch):
    """Unknown names and a forced Triton backend that cannot run raise with the reasons; auto picks cpu on CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="auto, reference, cpu, triton"):
        K.set_backend("fast")
    monkeypatch.setenv("MCF_FAST_KERNELS", "cpu")
    K.reset_backend()
    assert K.get_backend() == "cpu"
    monkeypatch.setenv("MCF_FAST_KERNELS", "auto")
    K.reset_backend()
    assert backend.resolve(torch.device("cpu")) == "cpu"
    backend._chosen = "triton"  # as if set on a GPU machine, then handed CPU tensors
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors"):
        K.gather_visible(torch.randn(1, 4, 2), torch.zeros(1, 2, dtype=torch.long))
    if not torch.cuda.is_available():
        K.reset_backend()
        with pytest.raises(RuntimeError, match="no CUDA device"):
            K.set_backend("triton")


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_torch_compile_fullgraph(op):
    """torch.compile(fullgraph=True) traces through the registered ops and their autograd (CPU, aot_eager)."""
    N, L, D = 2, 12, 8
    ids, restore = _ids(N, L, 0.5)
    K.set_backend("cpu")
    if op == "gather":
        args = (torch.randn(N, L, D, requires_grad=True), ids, torch.randn(L + 1, D, requires_grad=True),
                torch.randn(D, requires_grad=True))
        fn, ref = K.gather_visible, K.gather_visible_ref
    else:
        args = (torch.randn(N, 1 + ids.shape[1], D, requires_grad=True), restore,
                torch.randn(D, requires_grad=True), torch.randn(L + 1, D, requires_grad=True))
        fn, ref = K.scatter_to_full, K.scatter_to_full_ref
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    assert torch.equal(out, ref(*args))
    g = torch.randn_like(out)
    leaves = [a for a in args if a.requires_grad]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref(*args), leaves, g)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_autocast_bf16_engine_call():
    """Under CPU autocast (bf16 patch tokens, fp32 pos/cls) the ops run and match the reference exactly."""
    N, L, D = 2, 196, 32
    ids, restore = _ids(N, L, 0.75)
    K.set_backend("cpu")
    pe = torch.randn(1, 1 + L, D)
    cls = torch.randn(1, 1, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.Linear(D, D)(torch.randn(N, L, D))
        assert x.dtype == torch.bfloat16
        out = K.gather_visible(x, ids, pos=pe[0], cls=cls)
        ref = K.gather_visible_ref(x, ids, pos=pe[0], cls=cls)
        t = torch.nn.Linear(D, D)(out)
        full = K.scatter_to_full(t, restore, torch.zeros(1, 1, D), pos=pe[0])
        full_ref = K.scatter_to_full_ref(t, restore, torch.zeros(1, 1, D), pos=pe[0])
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(full, full_ref)
