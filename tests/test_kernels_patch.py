"""patch_mae in the life of an MAE model: saving, pickling, copies, replicas, DDP, FSDP2, compile, undo.

Each test runs the patched model and compares what it computes with the unpatched model for the
same seed (MAE's outputs, bit for bit), so a patch that is lost or bound to the wrong object fails.
"""
import copy
import io
import os
import pickle

import mcf_fast.kernels as K
import pytest
import torch
from mae_tiny import TinyMAE, mae_masking
from mcf_fast.kernels.mae_dropin import _forward_decoder_method, _random_masking_method
from torch import nn

IMGS_SHAPE = (3, 16, 12)  # N, L, patch dim of TinyMAE


@pytest.fixture(autouse=True)
def _cpu_backend():
    torch.manual_seed(0)
    K.set_backend("cpu")
    yield
    K.reset_backend()


def _run(model, imgs, seed=1, ratio=0.75):
    """loss, pred, mask and parameter gradients of one step from a fixed seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, pred, mask = model(imgs, ratio)
    loss.backward()
    return loss.detach(), pred.detach(), mask, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _same(a, b, grads_exact=False):
    (l0, p0, m0, g0), (l1, p1, m1, g1) = a, b
    assert torch.equal(l0, l1) and torch.equal(p0, p1) and torch.equal(m0, m1)
    close = (lambda u, v: torch.equal(u, v)) if grads_exact else (
        lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
    assert len(g0) == len(g1) and all(close(u, v) for u, v in zip(g0, g1))


def _pair():
    """(original, patched deep copy) with identical weights."""
    model = TinyMAE()
    return model, K.patch_mae(copy.deepcopy(model))


def _uses_fused(m):
    """The model's two methods are the fused ones, bound to this very object."""
    return (m.random_masking.__func__ is _random_masking_method and m.random_masking.__self__ is m
            and m.forward_decoder.__func__ is _forward_decoder_method and m.forward_decoder.__self__ is m)


def test_whole_model_torch_save_and_load():
    """torch.save(patched model) / torch.load(weights_only=False): still patched, MAE's outputs; state dict unchanged."""
    model, patched = _pair()
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert K.is_patched(loaded) and _uses_fused(loaded)
    imgs = torch.randn(*IMGS_SHAPE)
    _same(_run(model, imgs), _run(loaded, imgs))
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert list(sd0) == list(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_pickle_roundtrip():
    """pickle.dumps / loads of a patched model gives a patched model with the same outputs."""
    model, patched = _pair()
    back = pickle.loads(pickle.dumps(patched))
    assert K.is_patched(back) and _uses_fused(back)
    imgs = torch.randn(*IMGS_SHAPE)
    _same(_run(model, imgs), _run(back, imgs))


def test_copy_and_deepcopy_run_their_own_methods():
    """copy.copy and copy.deepcopy keep the patch, bound to the copy (not to the original)."""
    _, patched = _pair()
    for c in (copy.copy(patched), copy.deepcopy(patched)):
        assert c is not patched and K.is_patched(c) and _uses_fused(c)
    shallow = copy.copy(patched)
    shallow._modules = dict(shallow._modules)  # its own module table, then a different decoder head
    shallow.decoder_pred = nn.Linear(24, 12)
    nn.init.zeros_(shallow.decoder_pred.weight)
    nn.init.zeros_(shallow.decoder_pred.bias)
    imgs = torch.randn(*IMGS_SHAPE)
    assert not shallow(imgs)[1].any() and patched(imgs)[1].abs().sum() > 0


def test_data_parallel_replica_runs_its_own_decoder():
    """_replicate_for_data_parallel (nn.DataParallel's replicas): fused methods bound to the replica."""
    model, patched = _pair()
    replica = patched._replicate_for_data_parallel()
    assert K.is_patched(replica) and _uses_fused(replica)
    replica._parameters = dict(patched._parameters)  # what replicate() hands each replica (here: the same tensors)
    replica.decoder_pred = nn.Linear(24, 12)  # the replica's module table is its own copy
    nn.init.zeros_(replica.decoder_pred.weight)
    nn.init.zeros_(replica.decoder_pred.bias)
    imgs = torch.randn(*IMGS_SHAPE)
    torch.manual_seed(1)
    assert not replica(imgs)[1].any()
    dp = nn.DataParallel(patched)  # no GPU: DataParallel runs the module itself
    torch.manual_seed(1)
    loss, pred, mask = dp(imgs)
    torch.manual_seed(1)
    ref = model(imgs)
    assert torch.equal(loss, ref[0]) and torch.equal(pred, ref[1]) and torch.equal(mask, ref[2])


def test_patch_is_idempotent_and_unpatch_restores_bit_for_bit():
    """is_patched, patching twice is a no-op, unpatch_mae gives back the original class and outputs."""
    model, patched = _pair()
    assert not K.is_patched(model) and K.is_patched(patched)
    cls = type(patched)
    assert K.patch_mae(patched) is patched and type(patched) is cls
    imgs = torch.randn(*IMGS_SHAPE)
    want = _run(model, imgs)
    _same(want, _run(patched, imgs))
    assert K.unpatch_mae(patched) is patched and type(patched) is TinyMAE and not K.is_patched(patched)
    _same(want, _run(patched, imgs), grads_exact=True)
    assert K.unpatch_mae(patched) is patched and type(patched) is TinyMAE  # unpatching twice: no-op
    K.patch_mae(patched, decoder=False)
    assert patched.random_masking.__func__ is _random_masking_method
    assert patched.forward_decoder.__func__ is TinyMAE.forward_decoder


class DecoderOverride(TinyMAE):
    """A descendant with its own decoder (scales the prediction)."""

    def forward_decoder(self, x, ids_restore):
        return 2.0 * super().forward_decoder(x, ids_restore)


def test_subclass_override_is_refused_unless_kept():
    """A descendant overriding forward_decoder is refused naming the override; decoder=False keeps it."""
    m = DecoderOverride()
    with pytest.raises(TypeError, match=r"DecoderOverride\.forward_decoder overrides TinyMAE\.forward_decoder.*"
                                        r"decoder=False"):
        K.patch_mae(m)
    assert not K.is_patched(m)
    ref = copy.deepcopy(m)
    K.patch_mae(m, decoder=False)
    imgs = torch.randn(*IMGS_SHAPE)
    _same(_run(ref, imgs), _run(m, imgs))  # the override still runs: same predictions as unpatched
    monkey = TinyMAE()
    monkey.random_masking = lambda x, r: mae_masking(x, r, torch.rand(x.shape[:2]))
    with pytest.raises(TypeError, match="replaced on this instance.*del model.random_masking"):
        K.patch_mae(monkey)


def test_wrappers_are_refused_with_the_attribute_to_pass():
    """DataParallel / torch.compile wrappers: TypeError saying to pass .module / ._orig_mod."""
    with pytest.raises(TypeError, match=r"pass model\.module"):
        K.patch_mae(nn.DataParallel(TinyMAE()))
    with pytest.raises(TypeError, match=r"_orig_mod"):
        K.patch_mae(torch.compile(TinyMAE()))
    with pytest.raises(TypeError, match=r"pass model\.module"):
        K.unpatch_mae(nn.DataParallel(K.patch_mae(TinyMAE())))
    with pytest.raises(ValueError, match="nothing to patch"):
        K.patch_mae(TinyMAE(), masking=False, decoder=False)


def test_torch_compile_keeps_the_patch():
    """torch.compile of a patched model (aot_eager: dynamo + autograd tracing) gives the eager outputs."""
    model, patched = _pair()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=False)
    imgs = torch.randn(*IMGS_SHAPE)
    _same(_run(model, imgs), _run(compiled, imgs))


def test_mask_ratio_one_like_mae():
    """mask_ratio=1.0: x_masked is [N, 0, D], mask all ones, ids_restore as MAE's; a patched model runs."""
    x, noise = torch.randn(2, 16, 8), torch.rand(2, 16)
    ours, ref = K.random_masking(x, 1.0, noise), mae_masking(x, 1.0, noise)
    assert ours[0].shape == (2, 0, 8)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ours, ref))
    model, patched = _pair()
    imgs = torch.randn(*IMGS_SHAPE)
    _same(_run(model, imgs, ratio=1.0), _run(patched, imgs, ratio=1.0))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\]"):
        K.random_masking(x, 1.5)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group (torn down afterwards)."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp_path, 'pg')}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_and_fsdp2_keep_the_patch(one_rank_group):
    """DDP and FSDP2 (fully_shard) around a patched model: still patched, MAE's loss and gradients."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    model, patched = _pair()
    imgs = torch.randn(*IMGS_SHAPE)
    want = _run(model, imgs)
    ddp = DDP(patched)
    assert K.is_patched(ddp.module)
    _same(want, _run(ddp, imgs))
    sharded = copy.deepcopy(model)
    K.patch_mae(sharded)
    fully_shard(sharded)
    assert K.is_patched(sharded) and type(sharded).__name__.startswith("FSDP")
    got = _run(sharded, imgs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for p in sharded.parameters() if p.grad is not None]
    assert len(grads) == len(want[3]) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, want[3]))
    with pytest.raises(TypeError, match="unpatch before wrapping"):
        K.unpatch_mae(sharded)
    late = fully_shard(copy.deepcopy(model))
    with pytest.raises(TypeError, match="patch the model before fully_shard"):
        K.patch_mae(late)
