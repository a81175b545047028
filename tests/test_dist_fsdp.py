"""FSDP2 layout on 2 CPU ranks (gloo): what is sharded, each encoder a unit equal to the plain model, the
EMA without communication, per-rank memory, the full-encoder gather, the teacher placement, contrastive
negatives, the pictures' reconstruction, and bf16 mixed precision.

One job on the session's two ranks (conftest's `two_ranks`) runs every check (a process start costs
more than all the checks together) and returns each rank's measurements; the tests read them.
"""
from __future__ import annotations

import pytest
import torch

# The demo preset's widths (what the memory figure should describe), fewer blocks for speed.
ARCH = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=128,
            decoder_depth=1, decoder_num_heads=4, proj_hidden=512, proj_dim=128, teacher="random",
            teacher_arch=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
            teacher_layers=(0, 1), teacher_num_heads=2)
N_LOCAL = 4


class _Cfg:
    """The two config sections shard_model reads."""

    def __init__(self, teacher_sharding="replicate", reshard=True):
        from mcf_fast.train.config import DistConfig
        self.dist = DistConfig(teacher_sharding=teacher_sharding, reshard_after_forward=reshard)


def _inputs(rank: int, n: int, L: int):
    from mcf_fast.masking import random_masks
    g = torch.Generator().manual_seed(100 + rank)
    imgs = torch.randn(n, 3, ARCH["img_size"], ARCH["img_size"], generator=g)
    ids = torch.arange(n) + rank * n
    m = random_masks(n, L, 0.75, views=2, seed=0, step=0, sample_ids=ids)
    return imgs, m.ids_keep[0], m.ids_restore[0], m.mask[0], m.ids_keep[1]


def _model(seed=0, **kw):
    from mcf_fast.model.mcf import MCFModel
    torch.manual_seed(seed)
    return MCFModel(**{**ARCH, **kw}).train()


def _sharded_vs_plain(rt, inputs, **kw) -> list[float]:
    """[loss, encoder patch-embedding gradient] relative differences between the sharded model and the
    plain one (same init, same per-rank inputs: every collective in the model is rank-symmetric, and
    FSDP's gradient is the mean over ranks)."""
    import torch.distributed as dist

    from mcf_fast.train.fsdp import shard_model
    plain = _model(**kw)
    sharded = shard_model(_model(**kw), _Cfg("replicate"), rt)
    lp, ls = plain(*inputs, rank=rt.rank).loss, sharded(*inputs, rank=rt.rank).loss
    lp.backward()
    ls.backward()
    g = plain.encoder.patch_embed.proj.weight.grad.clone()
    dist.all_reduce(g)
    g /= rt.world_size
    gs = sharded.encoder.patch_embed.proj.weight.grad.full_tensor()
    return [abs(float(lp - ls)) / abs(float(lp)), float((g - gs).abs().max() / g.abs().max())]


def _opt_state_bytes(opt, local) -> int:
    return sum(local([v]) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _checks(rank: int, world: int) -> dict:
    """Every measurement of this file on one rank (the gloo group is already up)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    import mcf_fast.model.mcf as mcf
    from mcf_fast.model.mcf import ema_update
    from mcf_fast.train.fsdp import full_encoder, local_numel_bytes, shard_model
    from mcf_fast.train.runtime import Runtime

    rt = Runtime(torch.device("cpu"), "fp32", rank, world, rank)
    res: dict = {}

    # ---- single-rank figure: a plain model and AdamW after one step
    plain = _model()
    full_enc = {k: v.clone() for k, v in plain.encoder.state_dict().items()}  # before AdamW's decay
    trainable = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    res["single_bytes"] = local_numel_bytes(trainable) + _opt_state_bytes(opt, local_numel_bytes)
    del plain, opt

    # ---- sharded, teacher replicated
    model = shard_model(_model(), _Cfg("replicate"), rt)
    L = model.encoder.num_patches
    named = dict(model.named_parameters())
    res["not_dtensor"] = sorted(k for k, p in named.items()
                                if not isinstance(p, DTensor) and not k.startswith("perceptual."))
    res["teacher_dtensor"] = any(isinstance(p, DTensor) for p in model.perceptual.teacher.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    inputs = _inputs(rank, N_LOCAL, L)
    calls = []
    real_nce = mcf.ops.info_nce

    def spy(q, k, t, label_offset=0, scale=None):
        calls.append([q.shape[0], k.shape[0], label_offset])
        return real_nce(q, k, t, label_offset=label_offset, scale=scale)

    mcf.ops.info_nce = spy
    out_g = model(*inputs, rank=rank)
    out_g.loss.backward()
    out_l = model(*inputs, rank=rank, local_negatives=True)
    out_l.loss.backward()  # the root unit stays gathered from forward until its backward ends
    mcf.ops.info_nce = real_nce
    res["nce_calls"] = calls
    res["loss_replicated"] = float(out_g.loss.detach())
    opt.step()
    res["sharded_bytes"] = local_numel_bytes(trainable) + _opt_state_bytes(opt, local_numel_bytes)
    res["opt_state_dtensor"] = all(isinstance(v, DTensor) for st in opt.state.values() for k, v in st.items()
                                   if k != "step")

    # ---- EMA: pointwise on local shards, no collective
    t, o = model.ema_pairs()  # after backward: the sharded parameters are registered again
    before = [(x.to_local().clone(), y.to_local().clone()) for x, y in zip(t, o)]
    with CommDebugMode() as comm:
        ema_update(t, o, 0.9)
    res["ema_comms"] = comm.get_total_counts()
    res["ema_err"] = max(float((x.to_local() - (0.9 * a + 0.1 * b)).abs().max())
                         for x, (a, b) in zip(t, before) if x.to_local().numel())
    res["ema_same_layout"] = all(x.placements == y.placements and x.to_local().shape == y.to_local().shape
                                 for x, y in zip(t, o))

    # ---- full encoder gather equals the unsharded model's encoder (a fresh copy: `model` has stepped)
    fresh = shard_model(_model(), _Cfg("replicate"), rt)
    enc = full_encoder(fresh, rt)
    res["full_encoder_rank_none"] = enc is None
    if enc is not None:
        res["full_encoder_err"] = max(float((enc.state_dict()[k] - v).abs().max()) for k, v in full_enc.items())
        res["full_encoder_type"] = type(enc).__name__

    # ---- teacher sharded: same loss as replicated, teacher parameters sharded and frozen
    model_s = shard_model(_model(), _Cfg("shard"), rt)
    res["teacher_shard_dtensor"] = all(isinstance(p, DTensor) for p in model_s.perceptual.teacher.parameters())
    res["teacher_shard_trainable"] = any(p.requires_grad for p in model_s.perceptual.teacher.parameters())
    fresh_r = shard_model(_model(), _Cfg("replicate", reshard=False), rt)
    loss_s, loss_r = model_s(*inputs, rank=rank).loss, fresh_r(*inputs, rank=rank).loss
    res["teacher_shard_vs_replicate"] = abs(float(loss_s.detach()) - float(loss_r.detach())) / abs(float(loss_r.detach()))
    loss_s.backward()
    loss_r.backward()
    res["teacher_shard_grad_ok"] = all(p.grad is not None for p in model_s.encoder.blocks.parameters())

    # ---- each encoder is a unit of its own (stem included), called through its registered methods
    from torch.distributed.fsdp import FSDPModule
    res["vit_units"] = [isinstance(v, FSDPModule) for v in (model.encoder, model.target_encoder)]
    res["vs_plain"] = _sharded_vs_plain(rt, inputs)
    res["vs_plain_ema_teacher"] = _sharded_vs_plain(rt, inputs, teacher="ema")
    # ---- the pictures' reconstruction runs on every rank together and equals the plain model's
    ids_keep, ids_restore = inputs[1], inputs[2]
    pic = shard_model(_model(), _Cfg("replicate"), rt).reconstruct(inputs[0], ids_keep, ids_restore)
    res["reconstruct_err"] = float((pic - _model().reconstruct(inputs[0], ids_keep, ids_restore)).abs().max())

    # ---- bf16 parameters and compute, fp32 gradients
    model_b = shard_model(_model(), _Cfg("replicate"), Runtime(torch.device("cpu"), "bf16", rank, world, rank))
    seen = []
    h = model_b.encoder.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    # No autocast here: the policy alone casts parameters and inputs (the loop adds autocast on top).
    lb = model_b(*inputs, rank=rank).loss
    lb.float().backward()
    h.remove()
    res["bf16_param_dtype"] = str(seen[0])
    res["bf16_grad_dtype"] = str(model_b.encoder.blocks[0].attn.qkv.weight.grad.dtype)
    res["bf16_loss_finite"] = bool(torch.isfinite(lb.float()))

    return res


@pytest.fixture(scope="module")
def ranks(two_ranks):
    return two_ranks.run(_checks)


def test_everything_but_the_replicated_teacher_is_sharded(ranks):
    """Every model parameter is a DTensor after shard_model, except the replicated teacher's."""
    for r in ranks:
        assert r["not_dtensor"] == []
        assert r["teacher_dtensor"] is False


def test_ema_is_shard_local(ranks):
    """The EMA over sharded parameters issues no collective and equals m*t + (1-m)*o on each shard."""
    for r in ranks:
        assert r["ema_same_layout"]
        assert r["ema_comms"] == 0
        assert r["ema_err"] < 1e-6


def test_per_rank_memory_at_most_055(ranks):
    """Trainable parameters + AdamW state held per rank at 2 ranks <= 0.55x the single-rank bytes."""
    for r in ranks:
        assert r["opt_state_dtensor"]
        ratio = r["sharded_bytes"] / r["single_bytes"]
        print(f"per-rank bytes {r['sharded_bytes']} / single-rank {r['single_bytes']} = {ratio:.4f}")
        assert 0.45 <= ratio <= 0.55, ratio


def test_global_and_local_negatives(ranks):
    """'global': k gathered from both ranks with labels offset N*rank; 'local': own k, offset 0."""
    for rank, r in enumerate(ranks):
        assert r["nce_calls"] == [[N_LOCAL, 2 * N_LOCAL, N_LOCAL * rank], [N_LOCAL, N_LOCAL, 0]]


def test_full_encoder_gathers_on_rank0(ranks):
    """full_encoder returns a plain VisionTransformer with the unsharded weights on rank 0, None elsewhere."""
    assert ranks[0]["full_encoder_type"] == "VisionTransformer"
    assert ranks[0]["full_encoder_err"] == 0.0
    assert ranks[1]["full_encoder_rank_none"] is True


def test_sharded_teacher_matches_replicated(ranks):
    """teacher_sharding='shard': teacher weights sharded and frozen, same loss as replicated, grads flow."""
    for r in ranks:
        assert r["teacher_shard_dtensor"] and not r["teacher_shard_trainable"]
        assert r["teacher_shard_vs_replicate"] < 1e-6
        assert r["teacher_shard_grad_ok"]


def test_bf16_policy(ranks):
    """precision bf16: blocks compute with bf16 parameters, sharded gradients stay fp32."""
    for r in ranks:
        assert r["bf16_param_dtype"] == "torch.bfloat16"
        assert r["bf16_grad_dtype"] == "torch.float32"
        assert r["bf16_loss_finite"]


def test_encoders_are_units_that_match_the_plain_model(ranks):
    """The online and target encoders are FSDP units of their own (stem with them, nothing left in the
    root): the sharded loss and the encoder's patch-embedding gradient equal the plain model's, with a
    random teacher and with the 'ema' teacher (the target encoder's forward_intermediates)."""
    for r in ranks:
        assert r["vit_units"] == [True, True]
        for key in ("vs_plain", "vs_plain_ema_teacher"):
            assert r[key][0] < 1e-6 and r[key][1] < 1e-5, (key, r[key])


def test_pictures_reconstruct_on_the_sharded_model(ranks):
    """MCFModel.reconstruct (the pictures) is an FSDP forward method: every rank runs it on the sharded
    model and gets the plain model's image."""
    for r in ranks:
        assert r["reconstruct_err"] < 1e-5
