"""The flat-state allocator: constant ops per step, paper-order parity, resume, loss scaling, accumulation,
memory, non-finite gradients."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import lambdas, lora_params, regression_batch, svd_stack
from tooling.device import DEVICE, ON_GPU

from adalora_fast import FastSVDLinear, RankAllocator
from adalora_fast.discovery import find_adapter_triplets
from adalora_fast.flat_state import FlatAdapterState
from adalora_fast.reference import BudgetSchedule, ReferenceRankAllocator

CUDA = ON_GPU


def _stack(n_layers, d=16, r=4, seed=0):
    return svd_stack(n_layers, d, r, seed)


def _alloc(model, r=4, total=60, tinit=5, tfinal=15, deltaT=2, **kw):
    return RankAllocator(model, lora_r=r, target_rank=r // 2, init_warmup=tinit, final_warmup=tfinal,
                         mask_interval=deltaT, beta1=0.85, beta2=0.85, total_step=total, semantics="peft", **kw)  # fmt: skip


def _data(step, n=32, d=16, micro=None):
    x, y = regression_batch(step, n, d)
    return (x, y) if micro is None else (x[micro::2], y[micro::2])


# ---------------------------------------------------------------------------------------------------
# Constant number of ops per step


def _ops_per_step(n_layers):
    model = _stack(n_layers)
    alloc = _alloc(model)
    nn.functional.mse_loss(model(_data(0)[0]), _data(0)[1]).backward()
    alloc.update_and_mask(model, 9)  # warm-up (a budgeting step that masks)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        alloc.update_and_mask(model, 10)
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return sorted(e.name for e in top_level)


def test_ops_per_allocator_step_do_not_grow_with_the_number_of_layers():
    ops_8, ops_64 = _ops_per_step(8), _ops_per_step(64)
    assert ops_8 == ops_64
    assert len(ops_8) < 100  # PEFT launches about 70 per module


# ---------------------------------------------------------------------------------------------------
# Paper order over >= 200 steps against the reference run in the same order


@pytest.mark.parametrize("deltaT", [1, 10])
def test_paper_order_matches_the_reference_for_200_steps(deltaT, monkeypatch):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    total, tinit, tfinal = 200, 20, 40
    fast, ref = _stack(3), _stack(3)
    alloc = _alloc(fast, total=total, tinit=tinit, tfinal=tfinal, deltaT=deltaT, order="paper")
    sched = BudgetSchedule(init_bgt=12, target_bgt=6, tinit=tinit, tfinal=tfinal, total_step=total, deltaT=deltaT)
    engine = ReferenceRankAllocator(find_adapter_triplets(ref), sched, 0.85, 0.85, semantics="peft", order="paper")
    opt_f, opt_r = torch.optim.AdamW(lora_params(fast), lr=1e-2), torch.optim.AdamW(lora_params(ref), lr=1e-2)
    for step in range(total):
        x, y = _data(step)
        nn.functional.mse_loss(fast(x), y).backward()
        nn.functional.mse_loss(ref(x), y).backward()
        if step < sched.final_start:
            engine.update_ipt()  # θ_t, before the optimizer step
        opt_f.step()
        opt_r.step()
        alloc.update_and_mask(fast, step)
        engine.step(step)
        assert alloc.rank_pattern == engine.rank_pattern(), step
        assert all(torch.equal(a, b) for a, b in zip(lambdas(fast), lambdas(ref))), step
        opt_f.zero_grad()
        opt_r.zero_grad()


# ---------------------------------------------------------------------------------------------------
# Resume, loss scaling, gradient accumulation


def _train(model, alloc, opt, steps, start=0, scale=None, micro_batches=1):
    patterns = []
    for step in range(start, start + steps):
        for micro in range(micro_batches):
            x, y = _data(step, micro=None if micro_batches == 1 else micro)
            s = 1.0 if scale is None else scale(step)
            (nn.functional.mse_loss(model(x), y) * s / micro_batches).backward()
        if scale is None:
            opt.step()
        else:
            with torch.no_grad():  # SGD on the unscaled gradient; .grad keeps the scale, as under GradScaler
                for p in lora_params(model):
                    p -= 0.05 * p.grad / scale(step)
        alloc.update_and_mask(model, step, grad_scale=None if scale is None else scale(step))
        patterns.append((alloc.rank_pattern, lambdas(model)))
        model.zero_grad()
    return patterns


def _same(run_a, run_b):
    for (pa, la), (pb, lb) in zip(run_a, run_b):
        assert pa == pb
        assert all(torch.equal(a, b) for a, b in zip(la, lb))


def test_resume_mid_budgeting_continues_bit_identically():
    model = _stack(3)
    alloc = _alloc(model)
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    uninterrupted = _train(model, alloc, opt, 60)

    model = _stack(3)
    alloc = _alloc(model)
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    first = _train(model, alloc, opt, 25)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), alloc.state_dict()))
    model2 = _stack(3, seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(lora_params(model2), lr=1e-2)
    opt2.load_state_dict(saved[1])
    alloc2 = _alloc(model2)
    alloc2.load_state_dict(saved[2])
    resumed = first + _train(model2, alloc2, opt2, 35, start=25)
    _same(uninterrupted, resumed)


def test_load_state_dict_rejects_another_model():
    alloc = _alloc(_stack(3))
    with pytest.raises(ValueError, match="does not match"):
        _alloc(_stack(4)).load_state_dict(alloc.state_dict())


def test_masks_do_not_depend_on_the_loss_scale():
    def run(scale):
        model = _stack(3)
        return _train(model, _alloc(model), None, 60, scale=scale)

    unscaled = run(lambda step: 1.0)
    scaled = run(lambda step: 2.0 ** (10 + step % 3))  # a scale that moves, as GradScaler's does
    _same(unscaled, scaled)
    assert any(p is not None for p, _ in unscaled)


@pytest.mark.parametrize("scale", [torch.tensor(1024.0), 512.0])
def test_a_capture_of_some_parameters_divides_the_loss_scale_out_of_those_alone(scale):
    # ZeRO captures one parameter group at a time, over some of the captured buffer's views: a scale the
    # gradients still carry is divided out of those, and the other views keep what they hold.
    model = _stack(2)
    nn.functional.mse_loss(model(_data(0)[0]), _data(0)[1]).backward()
    state = FlatAdapterState(find_adapter_triplets(model), 0.85, 0.85, capture="sensitivity")
    state.captured.fill_(-7.0)
    picked = [0, 2, 3]
    params = [state.flat_params[k][1] for k in picked]
    state._capture([state.captured_views[k] for k in picked], [p.grad * scale for p in params], params, scale)
    for k, view in enumerate(state.captured_views):
        p = state.flat_params[k][1]
        expected = (p.grad * p).reshape(view.shape) if k in picked else torch.full_like(view, -7.0)
        torch.testing.assert_close(view, expected, rtol=1e-6, atol=0)
    assert state._captured_step


def test_gradient_accumulation_gives_the_masks_of_one_big_batch():
    model_a, model_b = _stack(3), _stack(3)
    alloc_a, alloc_b = _alloc(model_a), _alloc(model_b)
    big = _train(model_a, alloc_a, torch.optim.SGD(lora_params(model_a), lr=0.05), 60)
    accumulated = _train(model_b, alloc_b, torch.optim.SGD(lora_params(model_b), lr=0.05), 60, micro_batches=2)
    assert [p for p, _ in big] == [p for p, _ in accumulated]
    for (_, la), (_, lb) in zip(big, accumulated):
        for a, b in zip(la, lb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Memory and bad input


def test_persistent_state_is_at_most_twice_the_adapter_parameters():
    model = _stack(6, d=64, r=12)
    alloc = _alloc(model, r=12)
    adapter_bytes = sum(p.numel() * p.element_size() for p in lora_params(model))
    per_triplet_bytes = 3 * sum(t.rank for t in alloc.triplets) * 4 + 64  # scores, keep, factor, flags
    assert alloc.persistent_bytes() <= 2 * adapter_bytes + per_triplet_bytes


def _nan_run(policy):
    model = _stack(3)
    alloc = _alloc(model, nonfinite=policy)
    opt = torch.optim.SGD(lora_params(model), lr=0.05)
    _train(model, alloc, opt, 10)
    before = (alloc.state.exp_avg_ipt.clone(), alloc.state.keep.clone(), lambdas(model))
    x, y = _data(10)
    nn.functional.mse_loss(model(x), y).backward()
    model[0].lora_A.grad[0, 0] = float("nan")
    return model, alloc, before


def test_a_nan_gradient_never_becomes_a_mask():
    model, alloc, before = _nan_run("skip")
    alloc.update_and_mask(model, 10)  # a masking step (10 % 2 == 0)
    assert torch.equal(alloc.state.exp_avg_ipt, before[0]) and torch.equal(alloc.state.keep, before[1])
    assert all(torch.equal(a, b) for a, b in zip(lambdas(model), before[2]))
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) had a non-finite gradient"):
        pattern = alloc.rank_pattern
    assert pattern is not None and all(len(v) == 4 for v in pattern.values())


def test_a_nan_gradient_raises_when_asked():
    model, alloc, _ = _nan_run("raise")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        alloc.update_and_mask(model, 10)


def test_adapters_of_different_dtypes_are_a_clear_error():
    model = nn.Sequential(FastSVDLinear(4, 4, r=2), FastSVDLinear(4, 4, r=2).double())
    with pytest.raises(ValueError, match="share one dtype and device"):
        _alloc(model, r=2)


# ---------------------------------------------------------------------------------------------------
# The one-pass CPU update and masking (csrc/rank_allocator_cpu.cpp) against the ATen ops they replace


@pytest.mark.parametrize("scale", [None, 3.0, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_one_pass_cpu_update_equals_the_aten_ops_bitwise(dtype, scale):
    """Ī, Ū, the non-finite count and the step flags of the C++ pass equal those of _update_emas + _settle,
    bit for bit, over steps that score, steps that do not, a non-finite gradient and a strided gradient."""
    model = svd_stack(3, d=10, r=5, dtype=dtype)
    triplets = find_adapter_triplets(model)
    one_pass, aten = FlatAdapterState(triplets, 0.85, 0.8), FlatAdapterState(triplets, 0.85, 0.8)
    assert one_pass._one_pass
    aten._one_pass = False
    params = [p for _, p in one_pass.flat_params]
    g = torch.Generator().manual_seed(0)
    grad_scale = torch.tensor(1024.0) if scale == "tensor" else scale
    for step in range(8):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.1)
                grad = torch.randn(p.shape[::-1], generator=g).to(dtype).T  # (a strided gradient)
                p.grad = grad if p.dim() == 2 else grad.contiguous()
            if step == 5:
                params[4].grad[0, 0] = float("inf")
        scoring = step != 3
        for state in (one_pass, aten):
            state.set_control(2, scoring, False)
        assert one_pass._update_in_one_pass(grad_scale) is not None  # (ran, not declined)
        aten.update_from_gradients(grad_scale)
        for name in ("exp_avg_ipt", "exp_avg_unc", "nonfinite_steps"):
            assert torch.equal(getattr(one_pass, name), getattr(aten, name)), (step, name)
        assert bool(one_pass.step_finite) == bool(aten.step_finite) == (step != 5), step
    versions = [one_pass.exp_avg_ipt._version, one_pass.exp_avg_unc._version]
    one_pass._update_in_one_pass(grad_scale)
    assert one_pass.exp_avg_ipt._version > versions[0] and one_pass.exp_avg_unc._version > versions[1]
    assert int(one_pass.nonfinite_steps) == 1 and one_pass.exp_avg_ipt.abs().sum() > 0


def test_a_step_that_does_not_mask_runs_no_masking_op():
    model = _stack(2)
    alloc = _alloc(model, deltaT=2)
    nn.functional.mse_loss(model(_data(0)[0]), _data(0)[1]).backward()
    before = [lam.clone() for lam in lambdas(model)]
    for step, masks in ((9, False), (10, True)):  # (in the budgeting phase: every deltaT-th step masks)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _, threshold = alloc.update_and_mask(model, step)
        names = {e.name for e in prof.events()}
        masked_here = bool(names & {"adalora_fast::mask_to_budget_", "aten::sort"})  # (on CPU tensors: the C++ op)
        assert masked_here == masks == (threshold is not None), step
        if not masks:
            assert all(torch.equal(a, b) for a, b in zip(lambdas(model), before))
    assert not all(torch.equal(a, b) for a, b in zip(lambdas(model), before))  # (the masking step pruned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_one_pass_cpu_masking_equals_the_aten_ops_bitwise(dtype):
    """Threshold, keep, factor, Λ, the masked flag and the non-finite count of the C++ masking equal those of
    the ATen ops, bit for bit: a masking step, ties at the threshold, a step that does not mask, one whose
    sensitivity was not finite, one with a NaN score, and k at both ends."""
    models = [svd_stack(3, d=10, r=5, dtype=dtype) for _ in range(2)]
    states = [FlatAdapterState(find_adapter_triplets(m), 0.85, 0.8) for m in models]
    one_pass, aten = states
    assert one_pass._mask_in_one_pass
    aten._mask_in_one_pass = False
    g = torch.Generator().manual_seed(1)
    n = one_pass.scores.numel()
    nan_bits = {torch.float32: 0x7F800001, torch.float64: 0x7FF0000000000001, torch.float16: 0x7C01,
                torch.bfloat16: 0x7F81}[dtype]  # (a NaN with a payload, whose bits the threshold must keep)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    cases = [(4, True, None), (7, True, None), (1, True, None), (n, True, None), (5, False, None),
             (6, True, torch.tensor(False)), (3, True, "nan"), (9, True, torch.tensor(True)), (5, True, "±0"),
             (n, True, "nan payload")]  # fmt: skip
    for step, (k, masks, finite) in enumerate(cases):
        scores = torch.randint(0, 6, (n,), generator=g).to(dtype) / 4  # (ties)
        if finite == "nan":
            scores[2], finite = float("nan"), None
        elif finite == "±0":  # (ties of signed zeros at the threshold: a stable sort's order decides which)
            scores[:8], finite = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0, 0.0, -0.0, 0.0], dtype=dtype), None
        elif finite == "nan payload":
            scores[4], finite = torch.tensor(nan_bits, dtype=as_int).view(dtype), None
        for state in states:
            state.scores.copy_(scores)
            state.set_control(k, True, masks)
            state._step_finite = finite
        thresholds = [state.mask() for state in states]
        assert torch.equal(thresholds[0].reshape(1).view(as_int), thresholds[1].reshape(1).view(as_int)), step
        for name in ("keep", "factor", "masked", "nonfinite_steps"):
            assert torch.equal(getattr(one_pass, name), getattr(aten, name)), (step, name)
        assert all(torch.equal(a, b) for a, b in zip(lambdas(models[0]), lambdas(models[1]))), step
    assert int(one_pass.nonfinite_steps) == 2 and bool(one_pass.masked)
    assert any(bool((lam == 0).any()) for lam in lambdas(models[0]))
    # (written in place as the ATen ops write: autograd sees each change)
    written = [one_pass.keep, one_pass.factor, one_pass.masked, *one_pass.lambdas]
    versions = [t._version for t in written]
    one_pass.mask()
    assert all(t._version > v for t, v in zip(written, versions))


def test_the_cpu_passes_decline_what_the_aten_ops_cast_or_promote():
    """A λ of another dtype than the rest of its triplet, or a one-element float64 loss-scale tensor over float32
    adapters: the C++ passes decline and the ATen ops run, with their results."""
    models = [svd_stack(2, d=8, r=4, dtype=torch.bfloat16) for _ in range(2)]
    for m in models:
        m[0].lora_E.data = m[0].lora_E.data.float()
    states = [FlatAdapterState(find_adapter_triplets(m), 0.85, 0.8) for m in models]
    states[1]._one_pass = states[1]._mask_in_one_pass = False
    for m in models:
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.5
    for state in states:
        state.set_control(3, True, True)
    assert states[0]._update_in_one_pass(None) is None
    for state in states:
        state.update_from_gradients()
        state.compute_scores()
    thresholds = [state.mask() for state in states]
    assert torch.equal(thresholds[0], thresholds[1]) and torch.equal(states[0].keep, states[1].keep)
    assert torch.equal(models[0][0].lora_E, models[1][0].lora_E) and models[0][0].lora_E.dtype == torch.float32
    model = svd_stack(2, d=8, r=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = FlatAdapterState(find_adapter_triplets(model), 0.85, 0.8)
    state.set_control(3, True, False)
    assert state._update_in_one_pass(torch.tensor([1 / 3], dtype=torch.float64)) is None
    assert state._update_in_one_pass(torch.tensor(1 / 3, dtype=torch.float64)) is not None  # (0-dim: no promotion)


def test_the_allocator_on_cpu_updates_in_one_pass():
    model = _stack(2)
    alloc = _alloc(model)
    nn.functional.mse_loss(model(_data(0)[0]), _data(0)[1]).backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        alloc.update_and_mask(model, 9)
    names = [e.name for e in prof.events()]
    assert names.count("adalora_fast::importance_update_") == 1 and "aten::_foreach_copy_" not in names
    assert alloc.state.exp_avg_ipt.abs().sum() > 0


@pytest.mark.skipif(not CUDA, reason="device synchronisation is a GPU property")
def test_allocator_step_has_no_host_sync_on_gpu():
    model = _stack(8).cuda()
    alloc = _alloc(model)
    x, y = (t.cuda() for t in _data(0))
    nn.functional.mse_loss(model(x), y).backward()
    alloc.update_and_mask(model, 9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (10, 11, 50):  # masking, non-masking, final phase
            alloc.update_and_mask(model, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_paper_order_masks_do_not_depend_on_the_loss_scale(backend):
    def run(scale):
        model = _stack(2).to(DEVICE)
        alloc = _alloc(model, total=24, tinit=2, tfinal=6, order="paper")
        out = []
        for step in range(24):
            alloc.set_grad_scale(scale(step))
            x, y = (t.to(DEVICE) for t in _data(step))
            (nn.functional.mse_loss(model(x), y) * scale(step)).backward()
            with torch.no_grad():
                for p in lora_params(model):
                    p -= 0.05 * p.grad / scale(step)
            alloc.update_and_mask(model, step)
            out.append((alloc.rank_pattern, lambdas(model)))
            model.zero_grad()
        return out

    _same(run(lambda step: 1.0), run(lambda step: 2.0 ** (8 + step % 3)))
