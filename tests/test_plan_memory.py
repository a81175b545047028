"""Memory per GPU, collectives and disk: the sharded state, the FSDP2 layout, the checkpoint size."""
import os

import pytest
import torch

from mcf_fast.plan import comms, memory, storage
from mcf_fast.plan.hardware import GiB
from mcf_fast.plan.trace import trace_step
from mcf_fast.train.config import from_preset


def _demo(batch=8, **dist):
    cfg = from_preset("demo")
    cfg.optim.batch_size = batch
    for k, v in dist.items():
        setattr(cfg.dist, k, v)
    return cfg


@pytest.fixture(scope="module")
def traced():
    return trace_step(_demo(), "bf16")


@pytest.fixture
def fake_world():
    """A 4-rank fake process group: FSDP2 shards for real, collectives do nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield 4
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("teacher_sharding", ["replicate", "shard"])
def test_units_and_shards_are_those_fsdp2_makes(fake_world, traced, teacher_sharding):
    """unit_of (train/fsdp.py's unit_layout, as the trace records it) names the FSDP2 unit shard_model puts
    each parameter in, and shard_bytes the bytes rank 0 holds of it (the largest shard), checked on the
    sharded demo model: the layout as data and the layout applied agree."""
    from torch.distributed.fsdp import FSDPModule

    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train.fsdp import shard_model
    from mcf_fast.train.runtime import Runtime
    cfg = _demo(teacher_sharding=teacher_sharding)
    model = shard_model(MCFModel.from_config(cfg.model, seed=0), cfg, Runtime(torch.device("cpu"), "bf16", 0, fake_world, 0))
    unit_names = [n for n, m in model.named_modules() if isinstance(m, FSDPModule) and n]
    assert set(traced.layouts[teacher_sharding].units) == set(unit_names) | {""}
    for name, p in model.named_parameters():
        owner = max((u for u in unit_names if name.startswith(u + ".")), key=len, default="root")
        if hasattr(p, "to_local"):
            assert memory.unit_of(traced, name, teacher_sharding) == owner, name
            local = p.to_local()
            assert memory.shard_bytes(p.numel(), p.shape[0], p.numel() * 4, fake_world) == \
                local.numel() * local.element_size(), name
        else:  # a replicated teacher tensor: no unit
            assert memory.unit_of(traced, name, teacher_sharding) is None, name


def test_shard_bytes_pads_rows_to_an_equal_count():
    """Ten rows over four ranks: each rank holds ceil(10 / 4) = 3 rows; scalars stay whole."""
    assert memory.shard_bytes(10 * 6, 10, 10 * 6 * 4, 4) == 3 * 6 * 4
    assert memory.shard_bytes(1, 1, 4, 8) == 4


def test_one_process_is_the_traced_step(traced):
    """World 1: parameters + optimizer state + the traced peak (activations, casts, gradients), nothing else."""
    rows = memory.per_gpu(traced, 1, "bf16", "replicate", True)
    persistent = traced.bytes_of("trainable", "frozen", "buffer", "teacher", "optim")
    assert rows["total"] == persistent + traced.peak["all"] and rows["FSDP buffers"] == 0


def test_sharding_divides_the_state_and_drops_the_casts(traced):
    """World 8, bf16: state rows about 1/8 of one process's, the teacher replicated in bf16, the
    activations without autocast's weight casts, plus the gathered units in flight."""
    one = memory.per_gpu(traced, 1, "bf16", "replicate", True)
    rows = memory.per_gpu(traced, 8, "bf16", "replicate", True)
    assert one["optimizer state"] / 8 <= rows["optimizer state"] < one["optimizer state"] / 8 * 1.2
    assert rows["teacher"] == traced.bytes_of("teacher") // 2
    assert rows["activations"] == traced.peak["act"] < traced.peak["act+cast"]
    assert rows["FSDP buffers"] > 0
    sharded = memory.per_gpu(traced, 8, "bf16", "shard", True)
    assert sharded["teacher"] < rows["teacher"] / 3  # fp32 over 8 ranks vs bf16 whole, padding aside


def test_headroom_decides_the_fit():
    """needed = allocated x (1 + fragmentation) + fixed overheads; it fits when needed <= capacity."""
    r = memory.headroom(10 * GiB, 80 * GiB, 8, on_gpu=True)
    assert r["needed"] == int(10 * GiB * (1 + memory.GPU_FRAGMENTATION)) + memory.GPU_CONTEXT + memory.NCCL_BUFFERS
    assert r["fits"] and not memory.headroom(79 * GiB, 80 * GiB, 1, on_gpu=True)["fits"]
    live = memory.headroom(10 * GiB, 80 * GiB, 1, on_gpu=True, context_in_use=True)
    assert live["fixed"] == 0


def test_collectives_follow_the_fsdp2_units(traced):
    """Per optimizer step and GPU: forward gathers of online + target units, backward gathers of the
    trainable non-root ones, fp32 reduce-scatters, the keys; nothing for one process."""
    cfg = _demo()
    cfg.optim.accum_steps = 2
    assert comms.per_step(traced, cfg, 1, "bf16")["total"] == 0
    t = comms.per_step(traced, cfg, 4, "bf16")
    units = memory.units(traced, "replicate")
    model_numel = sum(v["numel"] for v in units.values())
    trainable = sum(v["trainable"] for v in units.values())
    assert t["gather forward"] == int(model_numel * 2 * 3 / 4 * 2)
    assert t["reduce-scatter"] == int(trainable * 4 * 3 / 4 * 2)
    assert t["keys"] == cfg.optim.batch_size * cfg.model.proj_dim * 4 * 3 * 2 and t["teacher gathers"] == 0
    link = comms.link_time(t, type("M", (), {"link": 100e9, "network": 10e9})(), nodes=2)
    assert link["seconds"] == pytest.approx(t["total"] / (10e9 * comms.LINK_EFFICIENCY))


def test_checkpoint_size_is_what_the_run_writes(tmp_path):
    """The sheet's checkpoint bytes are within 2% of a real checkpoint of the demo model (fp32 model
    without the teacher + AdamW state, written by train/checkpoint.py)."""
    from mcf_fast.model.mcf import MCFModel
    from mcf_fast.train import checkpoint as ckpt
    from mcf_fast.train.optim import build_optimizer
    cfg = _demo()
    model = MCFModel.from_config(cfg.model, seed=0)
    opt = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), torch.device("cpu"))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    path = ckpt.save(str(tmp_path), 1, model, opt, {"step": 1}, keep_last=2, finite=True)
    written = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
    predicted = storage.checkpoint_bytes(trace_step(cfg, "fp32"))
    assert abs(written / predicted - 1) < 0.02, (written, predicted)
