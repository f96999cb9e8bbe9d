"""Data parallel training on 2 gloo processes (CPU): every rank ends each step with the same masks, equal
to a single-process run over the same global batch.

DDP: the gradients are already all-reduced, so the ranks score identically with no extra communication.
FSDP2 (``fully_shard``): the adapters are sharded DTensors; the allocator scores the local shards and
combines the triplet scores with one all-reduce per step, and the penalty runs on the sharded P and Q.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

STEPS, GLOBAL_BATCH = 40, 16


def _model():
    from adalora_fast import FastSVDLinear

    torch.manual_seed(0)
    model = nn.Sequential(FastSVDLinear(12, 16, r=4, lora_alpha=4), nn.Tanh(), FastSVDLinear(16, 6, r=4, lora_alpha=4))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_E.normal_(std=0.5)
    return model


def _run(model, rank=0, world=1, sharded=False):
    from adalora_fast import RankAllocator, compute_orth_regu

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    alloc = RankAllocator(inner, 4, 2, 4, 10, 2, 0.85, 0.85, total_step=STEPS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    history = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard]) + compute_orth_regu(inner, 0.1)
        loss.backward()  # DDP averages the gradients: the global batch's mean
        opt.step()
        alloc.update_and_mask(inner, step)
        lambdas = [m.lora_E.detach() for m in (inner[0], inner[2])]
        if sharded:
            lambdas = [lam.full_tensor() for lam in lambdas]
        history.append((alloc.rank_pattern, [lam.clone() for lam in lambdas]))
        opt.zero_grad()
    return history


def _worker(rank, world, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if mode == "ddp":
            history = _run(nn.parallel.DistributedDataParallel(_model()), rank, world)
        else:
            from torch.distributed.fsdp import fully_shard

            model = _model()
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
            history = _run(model, rank, world, sharded=True)
        torch.save(history, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ranks_agree_with_each_other_and_with_one_process(tmp_path, mode):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _run(_model())
    for step, ((p0, l0), (p1, l1), (ps, ls)) in enumerate(zip(rank0, rank1, single)):
        assert p0 == p1, step  # identical masks on every rank, without any extra collective
        assert all(torch.equal(a, b) for a, b in zip(l0, l1)), step
        assert p0 == ps, step  # and the single-process masks over the same global batch
        for a, b in zip(l0, ls):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(p is not None for p, _ in single)
