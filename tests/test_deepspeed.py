"""DeepSpeed ZeRO-1/2/3 on 2 gloo processes (DeepSpeed's CPU accelerator), through ``deepspeed.initialize``
and through the ``Trainer`` with :class:`AdaLoraCallback`: every rank ends each step with the same masks and Λ,
equal to one process trained on the same global batches, in both orders; runs resumed from a checkpoint end
as the runs that were not interrupted; ``save_model`` under ZeRO-3 writes the adapter one process writes; the
Trainer's DDP keeps the penalty's weight; bf16, one step on the kernels, and the errors for what is refused.

The adapters are partitioned like every other parameter (ZeRO-3 with no persistence threshold: every
adapter is split between the ranks). The allocator takes each step's gradient inside DeepSpeed's step, where
it is unscaled and clipped; the runs clip (and the test checks that the clip was active), as one process's
``clip_grad_norm_`` then ``optimizer.step()`` clips. All runs happen in one start of the ranks (a start costs
more than the runs), shared by the tests through a module fixture.
"""

import json
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import allocator_flat_state, fast_mlp, peft_llama, token_batch, train_with_trainer
from tooling.ranks import run_ranks

from adalora_fast.integrations.peft import sync_rank_pattern

pytest.importorskip("deepspeed", reason="DeepSpeed is a test requirement (requirements-test.txt)")
pytestmark = pytest.mark.xdist_group("deepspeed")  # (one worker runs the module's fixture, once)

STEPS, CLIP, LR = 22, 0.04, 0.5
RESUME_AT = 11  # the ZeRO-3 run through deepspeed.initialize also resumes from a checkpoint after 11 steps
TRAINER_STEPS = 10  # warm-up 0-1, budgeting 2-6 (a mask every step), the final phase 7-9; a checkpoint at 5
TARGETS = ["q_proj", "v_proj", "down_proj"]
STAGES = (2, 3)  # every run; ZeRO-1 (the same fragments as ZeRO-2) runs the PEFT model's


def adalora_llama(steps=STEPS):
    import adalora_fast

    if steps == STEPS:  # warm-up 0-2, budgeting 3-15 (a mask every other step), the final phase 16-21
        return adalora_fast.patch_peft(peft_llama(tinit=3, tfinal=6, deltaT=2, total_step=steps, target_modules=TARGETS))
    return adalora_fast.patch_peft(peft_llama(tinit=2, tfinal=3, deltaT=1, total_step=steps, target_modules=TARGETS))


def _mlp_batch(step, rank=0, world=1):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)
    return x[rank::world], y[rank::world]


def _sgd(model):
    """SGD, so that the runs compare at rounding level (Adam's normalised steps turn rounding-level differences
    of near-zero gradients into steps of ±lr)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


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
        "zero_allow_untested_optimizer": True,  # (the client's torch.optim.SGD)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},  # fmt: skip
        "steps_per_print": 10**9,
    }


def _trainer_config(stage):
    """The DeepSpeed config a Trainer user writes ("auto": taken from TrainingArguments)."""
    config = _config(stage)
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping="auto")
    return config


def _train_with_trainer(out_dir, deepspeed=None, resume=None, per_device_batch=4, save=True, accumulate=1):
    """helpers.train_with_trainer on this module's Llama (10 steps, SGD)."""
    return train_with_trainer(adalora_llama(TRAINER_STEPS), out_dir, steps=TRAINER_STEPS, lr=LR, deepspeed=deepspeed,
                              resume=resume, per_device_batch=per_device_batch, save=save, accumulate=accumulate)  # fmt: skip


def _adapter_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _one_step_per_backend(deepspeed, rank, world) -> dict:
    """One ZeRO-3 step of the PEFT model on each adapter backend (the kernels: Triton's interpreter on a CPU):
    {backend: (loss, the adapters after the step, the calls that ran)}. The kernels read the parameters
    ZeRO-3 gathers for the layer's forward and backward."""
    from adalora_fast import dispatch

    out = {}
    for backend in ("reference", "triton"):
        os.environ[dispatch.BACKEND_ENV] = backend
        dispatch.reset_backend_calls()
        model = adalora_llama()
        engine, *_ = deepspeed.initialize(model=model, config=_config(3), optimizer=_sgd(model))
        ids = token_batch(0)[rank::world]
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(adapters):
            after = [p.detach().clone() for p in adapters]
        out[backend] = (loss.detach(), after, dispatch.backend_calls()["svd_adapter"])
    del os.environ[dispatch.BACKEND_ENV]
    return out


def _save_under_zero3(trainer, rank, out_dir) -> str:
    """save_pretrained on the partitioned adapters raises an error that says how to save; then saving as the
    Trainer does under ZeRO-3 on GPUs: a state dict gathered on every rank, written by rank 0. Returns the
    error's text."""
    model, engine = trainer.model, trainer.model_wrapped
    with pytest.raises(RuntimeError, match="partitioned by ZeRO-3") as error:
        model.save_pretrained(out_dir + "-partitioned")
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # (a collective: every rank)
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=state_dict)
    return str(error.value)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


class CountCollectives:
    """Counts torch.distributed's collectives called inside the block (DeepSpeed's go through them too)."""

    def __enter__(self):
        import torch.distributed as dist

        self.count, self._saved = 0, {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._counting(fn))
        return self

    def _counting(self, fn):
        def counted(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _peft_history(model, step_fn, stage=None, collectives=None, checkpoint=None, start=0):
    """After each step from ``start``: (rank pattern, Λ). ``collectives``: a list to append each allocator call's
    count to; ``checkpoint``: a folder for the engine's checkpoint and the allocator's state after RESUME_AT steps."""
    history = []
    for step in range(start, STEPS):
        if checkpoint is not None and step == RESUME_AT:
            import torch.distributed as dist
            from adalora_fast.integrations.peft import fast_allocator

            step_fn.keywords["engine"].save_checkpoint(checkpoint)
            torch.save(fast_allocator(model.base_model).state_dict(),
                       os.path.join(checkpoint, f"allocator-rank{dist.get_rank()}.pt"))  # fmt: skip
        step_fn(step)
        with CountCollectives() as counted:
            model.base_model.update_and_allocate(step)
        if collectives is not None:
            collectives.append(counted.count)
        sync_rank_pattern(model.base_model)
        history.append((model.peft_config["default"].rank_pattern, _lambdas(model, stage)))
    return history


def _engine_step(i, engine, rank, world, norms=None):
    """One step of the PEFT model through the engine on this rank's equal share of the global batch i."""
    ids = token_batch(i)[rank::world]
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)  # the penalty included
    engine.step()
    if norms is not None:
        norms.append(float(engine.get_global_grad_norm()))


def _zero_worker(rank, world, out_dir):
    import deepspeed
    import deepspeed.ops

    # No optional op is built: probing every op runs compilers, and the shared-memory collective (built on a
    # CPU machine's first run) costs more than the test; the collectives are gloo's.
    deepspeed.ops.__compatible_ops__ = {}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    results = {}
    for stage in (1, *STAGES):  # (all in one run: a run's start costs more than its steps)
        model = adalora_llama()
        engine, *_ = deepspeed.initialize(model=model, config=_config(stage), optimizer=_sgd(model))
        norms = []
        step = partial(_engine_step, engine=engine, rank=rank, world=world, norms=norms)

        collectives, checkpoint = [], os.path.join(out_dir, f"engine-zero{stage}")
        results[f"peft-zero{stage}"] = (_peft_history(model, step, stage, collectives, checkpoint), norms)
        results[f"collectives-zero{stage}"] = collectives
        if stage not in STAGES:
            continue
        if stage == 3:  # resumed from the engine's checkpoint at RESUME_AT and the allocator's state
            from adalora_fast.integrations.peft import fast_allocator

            model = adalora_llama()
            engine, *_ = deepspeed.initialize(model=model, config=_config(stage), optimizer=_sgd(model))
            engine.load_checkpoint(checkpoint)
            state = torch.load(os.path.join(checkpoint, f"allocator-rank{rank}.pt"), weights_only=False)
            fast_allocator(model.base_model, create=True).load_state_dict(state)
            resumed = _peft_history(model, partial(_engine_step, engine=engine, rank=rank, world=world), stage,
                                    start=RESUME_AT)  # fmt: skip
            results["peft-zero3-resumed"] = resumed
            results["kernels-zero3"] = _one_step_per_backend(deepspeed, rank, world)

        # Paper order on FastSVDLinear layers with the allocator itself: θ_t·∇θ_t of the reduced gradient
        # (unclipped, as one process's layers emit it in their backward).
        from adalora_fast import RankAllocator, compute_orth_regu

        mlp = fast_mlp()
        engine, *_ = deepspeed.initialize(model=mlp, config=_config(stage, clip=0.0), optimizer=_sgd(mlp))
        alloc = RankAllocator(mlp, 4, 2, 3, 6, 2, 0.85, 0.85, total_step=STEPS, order="paper")
        history = []
        for i in range(STEPS):
            x, y = _mlp_batch(i, rank, world)
            engine.backward(nn.functional.mse_loss(engine(x), y) + compute_orth_regu(mlp, 0.1))
            engine.step()
            alloc.update_and_mask(mlp, i)
            history.append((alloc.rank_pattern, _lambdas(mlp, stage)))
        results[f"paper-zero{stage}"] = (history, None)

        # The Trainer (Accelerate runs the engine's step inside its backward); under ZeRO-2 also a run resumed at
        # step 5 of its checkpoints. (Without accelerators Accelerate takes every rank for the main process, so
        # each would save a ZeRO-3 checkpoint's model as rank 0: ZeRO-3 saving is tested as the Trainer does it
        # on GPUs, below.)
        run_dir = os.path.join(out_dir, f"trainer-zero{stage}")
        # (ZeRO-3 accumulates two micro-batches of 1 per step: the same mean gradient)
        trainer, patterns = _train_with_trainer(run_dir, _trainer_config(stage), per_device_batch=2 if stage == 2 else 1,
                                                save=stage == 2, accumulate=1 if stage == 2 else 2)  # fmt: skip
        resumed_patterns = resumed_state = None
        if stage == 2:
            resumed, resumed_patterns = _train_with_trainer(run_dir, _trainer_config(stage), per_device_batch=2,
                                                            resume=os.path.join(run_dir, f"checkpoint-{TRAINER_STEPS // 2}"))  # fmt: skip
            resumed_state = allocator_flat_state(resumed)
        results[f"trainer-zero{stage}"] = (patterns, resumed_patterns, allocator_flat_state(trainer), resumed_state)
        if stage == 3:
            results["save-zero3"] = _save_under_zero3(trainer, rank, os.path.join(out_dir, "adapter-zero3"))
    # bf16 (DeepSpeed's bf16: the model in bf16, fp32 master copies): the allocator's state in bf16, the
    # gradient taken from the fp32 partitions, λ masked in both.
    model = adalora_llama()
    engine, *_ = deepspeed.initialize(model=model, config={**_config(3), "bf16": {"enabled": True}}, optimizer=_sgd(model))
    from adalora_fast.integrations.peft import fast_allocator

    bf16 = _peft_history(model, partial(_engine_step, engine=engine, rank=rank, world=world), 3)
    results["bf16-zero3"] = (bf16, fast_allocator(model.base_model).state.dtype)

    # An allocator made before deepspeed.initialize finds no gradient, and says why.
    from adalora_fast import RankAllocator

    mlp = fast_mlp()
    early = RankAllocator(mlp, 4, 2, 3, 6, 2, 0.85, 0.85, total_step=STEPS)
    engine, *_ = deepspeed.initialize(model=mlp, config=_config(2), optimizer=_sgd(mlp))
    x, y = _mlp_batch(0, rank, world)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    engine.step()
    with pytest.raises(RuntimeError, match="before deepspeed.initialize") as error:
        early.update_and_mask(mlp, 0)
    results["early-error"] = str(error.value)

    # Optimizer offload: the patched model's first training forward, which makes the allocator, says it is not
    # supported.
    model = adalora_llama()
    config = _config(3)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, config={**config, "zero_force_ds_cpu_optimizer": False},
                                      optimizer=_sgd(model))  # fmt: skip
    with pytest.raises(NotImplementedError, match="offload_optimizer") as error:
        ids = token_batch(0)[rank::world]
        engine(input_ids=ids, labels=ids, use_cache=False)
    results["offload-error"] = str(error.value)

    # The Trainer's DDP (use_cpu: Accelerate's multi-CPU setup, each rank its share of every batch). It averages
    # tokens across the ranks, multiplying each rank's loss by 2: the patched forward keeps the penalty's weight.
    trainer, patterns = _train_with_trainer(os.path.join(out_dir, "trainer-ddp"), per_device_batch=2, save=False)
    assert trainer.args.world_size == 2 and trainer.args.average_tokens_across_devices
    results["trainer-ddp"] = (patterns, _adapter_weights(trainer))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _one_process_peft():
    model = adalora_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _sgd(model)

    def step(i):
        opt.zero_grad()
        ids = token_batch(i)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()

    return _peft_history(model, step)


def _one_process_paper():
    from adalora_fast import RankAllocator, compute_orth_regu

    mlp = fast_mlp()
    opt = _sgd(mlp)
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


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """Every run of the ranks (one start), each rank's results."""
    out = tmp_path_factory.mktemp("zero")
    run_ranks(_zero_worker, 2, out, args=(str(out),), deadline_s=300)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_zero2_and_zero3_ranks_agree_with_each_other_and_with_one_process(zero_runs):
    _, runs = zero_runs
    single = {"peft": _one_process_peft(), "paper": _one_process_paper()}
    for name in ("peft-zero1", "peft-zero2", "peft-zero3", "paper-zero2", "paper-zero3"):
        (history, norms), (other, _) = runs[0][name], runs[1][name]
        reference = single[name.split("-")[0]]
        for step, ((p0, l0), (p1, l1), (ps, ls)) in enumerate(zip(history, other, reference, strict=True)):
            assert p0 == p1 == ps, (name, step)  # the same masks on every rank and as one process
            for a, b, c in zip(l0, l1, ls, strict=True):
                assert torch.equal(a, b), (name, step)  # every rank's λ written alike
                torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")
        if norms is not None:
            assert max(norms) > CLIP, (name, norms)  # the clip was active: the scores saw the clipped gradient
    for rank in range(2):  # resumed from the engine's checkpoint and the allocator's state: the same steps
        resumed, whole = runs[rank]["peft-zero3-resumed"], runs[rank]["peft-zero3"][0][RESUME_AT:]
        for step, ((p_resumed, l_resumed), (p_whole, l_whole)) in enumerate(zip(resumed, whole, strict=True)):
            assert p_resumed == p_whole, (rank, RESUME_AT + step)
            for a, b in zip(l_resumed, l_whole, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"rank {rank}, step {RESUME_AT + step}")
    for rank in range(2):  # the fused kernels under ZeRO-3, against the reference path
        runs_by_backend = runs[rank]["kernels-zero3"]
        (loss_ref, after_ref, calls_ref), (loss_k, after_k, calls_k) = runs_by_backend["reference"], runs_by_backend["triton"]
        assert calls_k == {"triton": 2 * len(TARGETS)} and "triton" not in calls_ref, (calls_k, calls_ref)
        torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=0)
        for a, b in zip(after_k, after_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    (bf16_0, dtype), (bf16_1, _) = runs[0]["bf16-zero3"], runs[1]["bf16-zero3"]
    assert dtype == torch.bfloat16
    for step, ((p0, l0), (p1, l1)) in enumerate(zip(bf16_0, bf16_1, strict=True)):  # bf16: the ranks agree
        assert p0 == p1 and all(torch.equal(a, b) for a, b in zip(l0, l1)), ("bf16", step)
    assert sum(map(sum, bf16_0[-1][0].values())) == 3 * len(TARGETS) * 2  # target_r in every adapted module
    for stage in (1, *STAGES):  # the allocator's collectives: one all-reduce per step, whatever the number of adapters
        assert runs[0][f"collectives-zero{stage}"] == [1] * STEPS, runs[0][f"collectives-zero{stage}"]
    for name, reference in single.items():
        final = reference[-1][0]
        assert final is not None and sum(map(sum, final.values())) < sum(map(len, final.values())), name


def test_trainer_under_zero_masks_as_one_process_and_resumes_exactly(zero_runs, tmp_path):
    """On a machine without accelerators Accelerate sets up no process group of its own under DeepSpeed: each
    rank reads every batch (DeepSpeed's engine still partitions over both ranks and averages their gradients),
    so the one-process run reads the same batches of 2."""
    _, runs = zero_runs
    _, single = _train_with_trainer(tmp_path / "single", per_device_batch=2, save=False)
    assert single[-1] is not None and sum(map(sum, single[-1].values())) == 3 * len(single[-1])  # target_r
    for stage in STAGES:
        (patterns, resumed, state, resumed_state), other = runs[0][f"trainer-zero{stage}"], runs[1][f"trainer-zero{stage}"]
        assert patterns == other[0] == single, stage  # every rank, every step, as one process
        if stage != 2:
            continue
        assert resumed == patterns[TRAINER_STEPS // 2 :], stage  # the resumed run's steps, as the whole run's
        for rank_state, rank_resumed in ((state, resumed_state), (other[2], other[3])):
            for key in ("exp_avg_ipt", "exp_avg_unc", "scores", "keep"):
                torch.testing.assert_close(rank_resumed[key], rank_state[key], rtol=1e-6, atol=0, msg=f"{stage} {key}")


def test_save_model_under_zero3_writes_the_one_process_adapter_and_stock_peft_loads_it(zero_runs, tmp_path):
    from helpers import tiny_llama
    from peft import PeftModel

    out, runs = zero_runs
    assert "stage3_gather_16bit_weights_on_model_save" in runs[0]["save-zero3"]  # the error says how to save
    trainer, _ = _train_with_trainer(tmp_path / "single", per_device_batch=2, save=False)  # (what each rank read)
    trainer.save_model(tmp_path / "adapter")
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (out / "adapter-zero3", tmp_path / "adapter")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"] is not None
    loaded = [PeftModel.from_pretrained(tiny_llama(), str(d)) for d in (out / "adapter-zero3", tmp_path / "adapter")]
    (zero, one) = [{n: p for n, p in m.named_parameters() if "lora_" in n} for m in loaded]
    assert zero.keys() == one.keys() and zero
    for name in zero:
        assert zero[name].shape == one[name].shape, name  # resized by the same rank pattern
        torch.testing.assert_close(zero[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_ddp_keeps_the_penalty_weight_of_one_process(zero_runs, tmp_path):
    """Stock PEFT adds the penalty inside the forward, so the Trainer's ×(number of ranks) weighs it N times."""
    _, runs = zero_runs
    trainer, single = _train_with_trainer(tmp_path / "single", per_device_batch=4, save=False)  # the global batch
    weights = _adapter_weights(trainer)
    for rank in range(2):
        patterns, rank_weights = runs[rank]["trainer-ddp"]
        assert patterns == single, rank
        for name, w in weights.items():
            torch.testing.assert_close(rank_weights[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_optimizer_offload_and_an_allocator_made_too_early_are_refused_with_errors_that_say_why(zero_runs):
    _, runs = zero_runs
    for rank in range(2):
        assert "does not support DeepSpeed's offload_optimizer" in runs[rank]["offload-error"]
        assert "Make it after deepspeed.initialize" in runs[rank]["early-error"]
