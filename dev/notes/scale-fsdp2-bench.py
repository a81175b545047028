"""A/B step timing for issue 6 on a shared CPU box: 1 rank x 64 vs 2 ranks x 32 (demo preset, fp32),
and the 2-rank teacher replicated vs sharded, interleaved inside one 2-process job so that the
ambient load of other processes hits every variant alike.

    python dev/notes/scale-fsdp2-bench.py [ROUNDS]

Phase "one": rank 0 trains the unsharded model on the global batch with 2 threads while rank 1 waits
in a blocking barrier; phases "two"/"two_shard": both ranks train FSDP2 models on half the batch,
1 thread each. Forward + backward + AdamW per timed step; prints the median seconds per variant.
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, rounds):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    import mcf_fast.model.heads as heads
    from mcf_fast.data import build_pretrain_loader
    from mcf_fast.masking import random_masks
    from mcf_fast.model.mcf import ema_update
    from mcf_fast.train.cli import parse_args
    from mcf_fast.train.fsdp import shard_model
    from mcf_fast.train.loop import build_model
    from mcf_fast.train.optim import build_optimizer
    from mcf_fast.train.runtime import Runtime

    cfg, _ = parse_args(["--preset", "demo", "--run.precision", "fp32"])
    rt = Runtime(torch.device("cpu"), "fp32", rank, world, rank)
    loader = build_pretrain_loader(cfg.data, batch_size=64, rank=0, world_size=1, seed=0, device="cpu")
    batches = [next(loader) for _ in range(2)]
    L = (cfg.model.img_size // cfg.model.patch_size) ** 2

    def make(shard, teacher="replicate"):
        m = build_model(cfg.model, 0).train()
        if shard:
            cfg.dist.teacher_sharding = teacher
            m = shard_model(m, cfg, rt)
        return m, build_optimizer(m, 1e-4, 0.05, (0.9, 0.95), rt.device), m.ema_pairs()

    def step(model, opt, pairs, batch, i, r, n):
        imgs, ids = batch.images[r * n:(r + 1) * n], batch.sample_ids[r * n:(r + 1) * n]
        mk = random_masks(n, L, 0.75, views=2, seed=0, step=i, sample_ids=ids)
        ema_update(*pairs, 0.99)
        res = model(imgs, mk.ids_keep[0], mk.ids_restore[0], mk.mask[0], mk.ids_keep[1], rank=r)
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {"two": make(True), "two_shard": make(True, "shard")}
    one = make(False) if rank == 0 else None
    times = {"one": [], "two": [], "two_shard": []}
    dist_on = heads._dist_on
    for i in range(rounds + 1):  # round 0 warms up
        dist.barrier()
        if rank == 0:
            # The plain model must not talk to rank 1 (its SyncBatchNorm and key gather would):
            # make it see a world of one for this phase.
            heads._dist_on = lambda: False
            torch.set_num_threads(2)
            t = time.perf_counter()
            step(*one, batches[i % 2], i, 0, 64)
            times["one"].append(time.perf_counter() - t)
            torch.set_num_threads(1)
            heads._dist_on = dist_on
        dist.barrier()
        for name, v in variants.items():
            dist.barrier()
            t = time.perf_counter()
            step(*v, batches[i % 2], i, rank, 32)
            dist.barrier()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        for name, ts in times.items():
            print(f"{name:10s} median {statistics.median(ts[1:]):.3f} s/step  (all: {[round(x, 2) for x in ts[1:]]})")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(worker, args=(2, 29611, int(sys.argv[1]) if len(sys.argv) > 1 else 5), nprocs=2)
