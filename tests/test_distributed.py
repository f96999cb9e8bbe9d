"""Data parallel training on 2 gloo processes (CPU): every rank ends each step with the same masks, equal
to a single-process run over the same global batch.

DDP: the gradients are already all-reduced, so the ranks score identically with no extra communication.
FSDP2 (``fully_shard``): the adapters are sharded DTensors; the allocator scores the local shards and
combines the triplet scores with one all-reduce per step, and the penalty runs on the sharded P and Q. In
paper order it scores θ_t·∇θ_t of the reduced gradient, taken in the optimizer's step pre-hook; under
GradScaler too, with SGD (unscaled before its step) and with the fused SGD and AdamW (handed the scale
instead).
The ranks run under a deadline (:mod:`tooling.ranks`): a hang fails the test with every rank's stack.
"""

import os

import torch
import torch.nn as nn
from helpers import fast_mlp, peft_llama, token_batch
from tooling.ranks import run_ranks

from adalora_fast.integrations.peft import sync_rank_pattern

STEPS, GLOBAL_BATCH = 40, 16


def _run(model, rank=0, world=1, sharded=False, order="reference", scaler=None, fused=False, adamw=False):
    """``scaler``: a GradScaler (the loss scaled by 2^10, the scale passed to the allocator as for paper order
    on one process, where the backward emits from the scaled gradients). ``fused``: the fused SGD (``adamw``:
    the fused AdamW), which GradScaler does not unscale for: it hands the optimizer the scale, and the step
    divides it out itself."""
    from adalora_fast import RankAllocator, compute_orth_regu

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    alloc = RankAllocator(inner, 4, 2, 4, 10, 2, 0.85, 0.85, total_step=STEPS, order=order)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, fused=True) if adamw else torch.optim.SGD(params, lr=0.05,
                                                                                       fused=fused or None)  # fmt: skip
    history = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard]) + compute_orth_regu(inner, 0.1)
        if scaler is None:
            loss.backward()  # DDP averages the gradients: the global batch's mean
            opt.step()
            alloc.update_and_mask(inner, step)
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)  # (unscales the gradients before the step, or, fused, has the step divide them)
            scaler.update()
            alloc.update_and_mask(inner, step, grad_scale=scale)
        lambdas = [m.lora_E.detach() for m in (inner[0], inner[2])]
        if sharded:
            lambdas = [lam.full_tensor() for lam in lambdas]
        history.append((alloc.rank_pattern, [lam.clone() for lam in lambdas] + [alloc.state.scores.clone()]))
        opt.zero_grad()
    return history


# mode: (the engine, the allocator's order). Paper order on FSDP2 scores θ_t·∇θ_t of the reduced gradient,
# taken in the optimizer's step pre-hook; one process scores the same in its layers' backward.
MODES = {"ddp": ("ddp", "reference"), "ddp-paper": ("ddp", "paper"), "ddp-paper-scaled": ("ddp", "paper"),
         "ddp-paper-scaled-fused": ("ddp", "paper"), "fsdp2": ("fsdp2", "reference"),
         "fsdp2-paper": ("fsdp2", "paper")}  # fmt: skip
# FSDP2 with the fused AdamW (the Trainer's default optimizer; the fused SGD cannot step DTensors), in paper
# order under GradScaler: compared with the same run unscaled (a one-process Adam run would not agree to
# rounding: Adam's normalised first steps turn a gradient's last bits into whole steps). The scale is a power
# of two, so dividing it out is exact and the two runs agree to the bit where it is divided out once.
ADAMW_MODES = {"fsdp2-paper-fused-adamw": None, "fsdp2-paper-scaled-fused-adamw": "fsdp2-paper-fused-adamw"}


def _fsdp2_mlp():
    from torch.distributed.fsdp import fully_shard

    model = fast_mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _scaler(mode):
    # (the scale doubles every step: a scale divided out twice would weigh the steps apart)
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if "scaled" in mode else None


def _worker(rank, world, out_dir):
    histories = {}
    for mode, (engine, order) in MODES.items():  # (all in one run: a run's start costs more than its steps)
        if engine == "ddp":
            histories[mode] = _run(nn.parallel.DistributedDataParallel(fast_mlp()), rank, world, order=order,
                                   scaler=_scaler(mode), fused=mode.endswith("fused"))  # fmt: skip
        else:
            histories[mode] = _run(_fsdp2_mlp(), rank, world, sharded=True, order=order)
    for mode in ADAMW_MODES:
        histories[mode] = _run(_fsdp2_mlp(), rank, world, sharded=True, order="paper", scaler=_scaler(mode), adamw=True)
    torch.save(histories, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    run_ranks(_worker, 2, tmp_path, args=(str(tmp_path),), deadline_s=180)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    singles = {order: _run(fast_mlp(), order=order) for order in ("reference", "paper")}
    for mode, (_, order) in MODES.items():
        single = singles[order]
        for step, ((p0, l0), (p1, l1), (ps, ls)) in enumerate(zip(runs[0][mode], runs[1][mode], single)):
            assert p0 == p1, (mode, step)  # identical masks on every rank, without any extra collective
            assert all(torch.equal(a, b) for a, b in zip(l0, l1)), (mode, step)
            assert p0 == ps, (mode, step)  # and the single-process masks over the same global batch
            for a, b in zip(l0, ls):  # Λ, then the triplet scores
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9, msg=f"{mode}, step {step}")
    assert all(any(p is not None for p, _ in single) for single in singles.values())
    for mode, unscaled in ADAMW_MODES.items():
        for rank in range(2):
            assert any(p is not None for p, _ in runs[rank][mode]), mode
            if unscaled is None:
                continue
            for step, ((p, lams), (pu, lams_u)) in enumerate(zip(runs[rank][mode], runs[rank][unscaled])):
                assert p == pu, (mode, rank, step)
                assert all(torch.equal(a, b) for a, b in zip(lams, lams_u)), (mode, rank, step)  # Λ, the scores


# ---------------------------------------------------------------------------------------------
# DDP with gradient checkpointing (PEFT #1745), on the patched PEFT model


def _peft_run(model, ddp=None, rank=0, world=1, steps=6):
    """AdamW steps with the allocator on :func:`helpers.token_batch`'s batches (this rank's equal share);
    the rank pattern after each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    patterns = []
    for step in range(steps):
        ids = token_batch(step)[rank::world]
        loss = (ddp or model)(input_ids=ids, labels=ids, use_cache=False).loss  # the penalty included
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
        sync_rank_pattern(model.base_model)
        patterns.append(model.peft_config["default"].rank_pattern)
    return patterns


def _patched_llama():
    import adalora_fast

    # warm-up at step 0, budgeting 1-3 (masking every step), the final phase 4-5
    return adalora_fast.patch_peft(peft_llama(tinit=1, tfinal=2, deltaT=1, total_step=6))


CHECKPOINTING = {"non-reentrant": False, "reentrant, static_graph": True}


def _checkpointed_ddp_worker(rank, world, out_dir):
    patterns = {}
    for setup, reentrant in CHECKPOINTING.items():  # (both in one run: a run's start costs more than its steps)
        model = _patched_llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        # Reentrant checkpointing runs each layer's backward as a nested backward, and the penalty uses P and Q
        # outside it: DDP needs static_graph to see their gradients arrive twice (else "mark a variable ready
        # only once", PEFT #1745, as with stock PEFT). Non-reentrant checkpointing needs nothing.
        ddp = nn.parallel.DistributedDataParallel(model, static_graph=reentrant)
        patterns[setup] = _peft_run(model, ddp, rank, world)
    torch.save(patterns, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_with_gradient_checkpointing_gives_one_process_masks(tmp_path):
    run_ranks(_checkpointed_ddp_worker, 2, tmp_path, args=(str(tmp_path),), deadline_s=240)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _peft_run(_patched_llama())
    for setup in CHECKPOINTING:
        assert rank0[setup] == rank1[setup] == single, setup
    assert single[-1] is not None and sum(map(sum, single[-1].values())) == 3 * len(single[-1])  # target_r
