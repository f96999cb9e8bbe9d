"""DeepSpeed ZeRO-2 and ZeRO-3 (``deepspeed.initialize``) on 2 gloo processes (DeepSpeed's CPU accelerator):
every rank ends each step with the same masks and Λ, equal to one process trained on the same global batches.

The adapters are partitioned like every other parameter (ZeRO-3 with no persistence threshold: every
adapter is split between the ranks). The allocator takes each step's gradient inside DeepSpeed's step, where
it is unscaled and clipped; the runs clip (and the test checks that the clip was active), as one process's
``clip_grad_norm_`` then ``optimizer.step()`` clips.
"""

import os

import pytest
import torch
import torch.nn as nn
from helpers import peft_llama, token_batch
from tooling.ranks import run_ranks

from adalora_fast.integrations.peft import sync_rank_pattern

pytest.importorskip("deepspeed", reason="DeepSpeed is a test requirement (requirements-test.txt)")

STEPS, CLIP, LR = 22, 0.08, 1e-2
TARGETS = ["q_proj", "v_proj", "down_proj"]
STAGES = (2, 3)


def _patched_llama():
    import adalora_fast

    # warm-up 0-2, budgeting 3-15 (a mask every other step), the final phase 16-21
    return adalora_fast.patch_peft(peft_llama(tinit=3, tfinal=6, deltaT=2, total_step=STEPS, target_modules=TARGETS))


def _fast_mlp():
    from adalora_fast import FastSVDLinear

    torch.manual_seed(0)
    model = nn.Sequential(FastSVDLinear(12, 16, r=4, lora_alpha=4), nn.Tanh(), FastSVDLinear(16, 6, r=4, lora_alpha=4))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_E.normal_(std=0.5)
    return model


def _mlp_batch(step, rank=0, world=1):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)
    return x[rank::world], y[rank::world]


def _lambdas(model, stage=None):
    """Every lora_E as the model sees it (gathered under ZeRO-3)."""
    lambdas = [p for n, p in model.named_parameters() if "lora_E" in n]
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(lambdas):
            return [p.detach().clone() for p in lambdas]
    return [p.detach().clone() for p in lambdas]


def _config(stage, clip=CLIP):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def _peft_history(model, step_fn, stage=None):
    """After each step: (rank pattern, Λ)."""
    history = []
    for step in range(STEPS):
        step_fn(step)
        model.base_model.update_and_allocate(step)
        sync_rank_pattern(model.base_model)
        history.append((model.peft_config["default"].rank_pattern, _lambdas(model, stage)))
    return history


def _zero_worker(rank, world, out_dir):
    import deepspeed
    import deepspeed.ops

    # No optional op is built: probing every op runs compilers, and the shared-memory collective (built on a
    # CPU machine's first run) costs more than the test; the collectives are gloo's.
    deepspeed.ops.__compatible_ops__ = {}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    results = {}
    for stage in STAGES:  # (all in one run: a run's start costs more than its steps)
        model = _patched_llama()
        engine, *_ = deepspeed.initialize(model=model, config=_config(stage),
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])  # fmt: skip
        norms = []

        def step(i, engine=engine, norms=norms):
            ids = token_batch(i)[rank::world]  # an equal share of the global batch
            engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)  # the penalty included
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))

        results[f"peft-zero{stage}"] = (_peft_history(model, step, stage), norms)

        # Paper order on FastSVDLinear layers with the allocator itself: θ_t·∇θ_t of the reduced gradient
        # (unclipped, as one process's layers emit it in their backward).
        from adalora_fast import RankAllocator, compute_orth_regu

        mlp = _fast_mlp()
        engine, *_ = deepspeed.initialize(model=mlp, model_parameters=[p for p in mlp.parameters() if p.requires_grad],
                                          config=_config(stage, clip=0.0))  # fmt: skip
        alloc = RankAllocator(mlp, 4, 2, 3, 6, 2, 0.85, 0.85, total_step=STEPS, order="paper")
        history = []
        for i in range(STEPS):
            x, y = _mlp_batch(i, rank, world)
            engine.backward(nn.functional.mse_loss(engine(x), y) + compute_orth_regu(mlp, 0.1))
            engine.step()
            alloc.update_and_mask(mlp, i)
            history.append((alloc.rank_pattern, _lambdas(mlp, stage)))
        results[f"paper-zero{stage}"] = (history, None)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _one_process_peft():
    model = _patched_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(i):
        opt.zero_grad()
        ids = token_batch(i)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()

    return _peft_history(model, step)


def _one_process_paper():
    from adalora_fast import RankAllocator, compute_orth_regu

    mlp = _fast_mlp()
    params = [p for p in mlp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    alloc = RankAllocator(mlp, 4, 2, 3, 6, 2, 0.85, 0.85, total_step=STEPS, order="paper")
    history = []
    for i in range(STEPS):
        x, y = _mlp_batch(i)
        (nn.functional.mse_loss(mlp(x), y) + compute_orth_regu(mlp, 0.1)).backward()
        opt.step()
        alloc.update_and_mask(mlp, i)
        opt.zero_grad()
        history.append((alloc.rank_pattern, _lambdas(mlp)))
    return history


def test_zero2_and_zero3_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    run_ranks(_zero_worker, 2, tmp_path, args=(str(tmp_path),), deadline_s=240)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = {"peft": _one_process_peft(), "paper": _one_process_paper()}
    for name, (history, norms) in runs[0].items():
        other = runs[1][name][0]
        reference = single[name.split("-")[0]]
        for step, ((p0, l0), (p1, l1), (ps, ls)) in enumerate(zip(history, other, reference, strict=True)):
            assert p0 == p1 == ps, (name, step)  # the same masks on every rank and as one process
            for a, b, c in zip(l0, l1, ls, strict=True):
                assert torch.equal(a, b), (name, step)  # every rank's λ written alike
                torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")
        if norms is not None:
            assert max(norms) > CLIP, (name, norms)  # the clip was active: the scores saw the clipped gradient
    for name, reference in single.items():
        final = reference[-1][0]
        assert final is not None and sum(map(sum, final.values())) < sum(map(len, final.values())), name
