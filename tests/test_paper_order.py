"""Paper-order importance (Algorithm 1): the backward emits sensitivity, EMAs and triplet scores from θ_t.

Checked against the reference allocator run in the same order (``update_ipt()`` between backward and
``optimizer.step()``), on the fused kernels (interpreter on a CPU) and on the reference path (hooks).
"""


import pytest
import torch
import torch.nn as nn
from tooling.device import DEVICE, KERNEL_DTYPES
from helpers import lora_params

from adalora_fast import FastSVDLinear, RankAllocator
from adalora_fast.discovery import find_adapter_triplets
from adalora_fast.reference import BudgetSchedule, ReferenceRankAllocator

SCHEDULE = dict(tinit=2, tfinal=4, total=16, deltaT=2)


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(FastSVDLinear(24, 20, r=6, lora_alpha=6), nn.Tanh(), FastSVDLinear(20, 12, r=6, lora_alpha=6))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_E.normal_(std=0.5)
    return model.to(DEVICE)


def _allocator(model, order, **kw):
    s = SCHEDULE
    return RankAllocator(model, lora_r=6, target_rank=3, init_warmup=s["tinit"], final_warmup=s["tfinal"],
                         mask_interval=s["deltaT"], beta1=0.85, beta2=0.85, total_step=s["total"],
                         semantics="peft", order=order, **kw)  # fmt: skip


def _reference_engine(model):
    s = SCHEDULE
    sched = BudgetSchedule(init_bgt=12, target_bgt=6, tinit=s["tinit"], tfinal=s["tfinal"], total_step=s["total"],
                           deltaT=s["deltaT"])  # fmt: skip
    return ReferenceRankAllocator(find_adapter_triplets(model), sched, 0.85, 0.85, semantics="peft", order="paper")


def _batch(step, micro=0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(16, 24, generator=g).to(DEVICE), torch.randn(16, 12, generator=g).to(DEVICE)


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _run_paper_order(backend, monkeypatch, steps=SCHEDULE["total"], tol=None):
    if backend == "triton":  # the kernels' epilogues must do the work, not the reference hooks
        from adalora_fast.importance import ImportanceState

        monkeypatch.setattr(ImportanceState, "arm_gradient_hooks", lambda self: pytest.fail("gradient hooks armed"))
    fast, ref = _model(), _model()
    alloc = _allocator(fast, "paper")
    engine = _reference_engine(ref)
    opt_f = torch.optim.SGD(lora_params(fast), lr=0.05)
    opt_r = torch.optim.SGD(lora_params(ref), lr=0.05)
    emitted = 0
    for step in range(steps):
        x, y = _batch(step)
        monkeypatch.setenv("ADALORA_FAST_BACKEND", backend)
        _loss(fast, x, y).backward()
        monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
        _loss(ref, x, y).backward()
        if step < engine.schedule.final_start:
            engine.update_ipt()  # the reference, in the paper's order: θ_t and g_t, before the step
            emitted += 1
            for state, t in zip(alloc.importance_states, engine.triplets):
                for name, p_name in (("lora_A", t.name_A), ("lora_E", t.name_E), ("lora_B", t.name_B)):
                    for got, want in ((state.exp_avg_ipt[name], engine.exp_avg_ipt[p_name]),
                                      (state.exp_avg_unc[name], engine.exp_avg_unc[p_name])):  # fmt: skip
                        if tol is None:
                            assert torch.equal(got, want), (step, p_name)
                        else:
                            torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
        opt_f.step()
        opt_r.step()
        alloc.update_and_mask(fast, step)
        engine.step(step)
        assert alloc.rank_pattern == engine.rank_pattern(), step
        opt_f.zero_grad()
        opt_r.zero_grad()
    assert emitted == SCHEDULE["total"] - SCHEDULE["tfinal"]
    assert sum(sum(v) for v in alloc.rank_pattern.values()) <= 6


def test_reference_path_paper_order_is_bitwise_the_reference(monkeypatch):
    _run_paper_order("reference", monkeypatch)


def test_kernel_epilogues_match_the_reference_in_paper_order(kernels, monkeypatch):
    _run_paper_order("triton", monkeypatch, tol=1e-4)


def test_gradient_accumulation_scores_the_accumulated_gradient(backend, monkeypatch):
    fast = _model()
    alloc = _allocator(fast, "paper", grad_accumulation_steps=3)
    for micro in range(3):
        x, y = _batch(0, micro)
        (_loss(fast, x, y) / 3).backward()
    # |w·Σg| from the accumulated .grad, through the reference update (EMA from zero: Ī = (1−β1)·I).
    for state in alloc.importance_states:
        for name, p in state.params.items():
            expected = 0.15 * (p.detach() * p.grad).abs()
            torch.testing.assert_close(state.exp_avg_ipt[name], expected.to(p.dtype), rtol=1e-4, atol=1e-7)
        assert state.emissions == 1
    alloc.update_and_mask(fast, 0)


def test_emission_leaves_the_gradients_unchanged(kernels, monkeypatch):
    plain, emitting = _model(), _model()
    _allocator(emitting, "paper")
    x, y = _batch(0)
    _loss(plain, x, y).backward()
    _loss(emitting, x, y).backward()
    for a, b in zip(lora_params(plain), lora_params(emitting)):
        assert torch.equal(a.grad, b.grad)


def test_no_emission_outside_training_is_a_clear_error():
    model = _model()
    alloc = _allocator(model, "paper")
    model.eval()
    x, y = _batch(0)
    model.train(False)
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="emitted no importance since the last step"):
        alloc.update_and_mask(model, 0)


def test_paper_order_needs_fast_layers():
    from helpers import peft_mlp

    with pytest.raises(ValueError, match="order='paper' needs every adapter to be a FastSVDLinear"):
        RankAllocator(peft_mlp(), 12, 8, 2, 4, 2, 0.85, 0.85, total_step=16, order="paper")


def test_unknown_order():
    with pytest.raises(ValueError, match="order must be one of"):
        _allocator(_model(), "eager")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_emitted_scores_match_the_reference_functions(kernels, dtype, dropout, monkeypatch):
    from adalora_fast.importance import ImportanceState
    from adalora_fast.reference import (
        element_score,
        sensitivity,
        triplet_score,
        update_importance_ema,
    )

    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    layer = FastSVDLinear(70, 45, r=12, lora_alpha=12, lora_dropout=dropout).to(DEVICE, dtype)
    with torch.no_grad():
        layer.lora_E.normal_()
    names = ("lora_A", "lora_E", "lora_B")
    params = [getattr(layer, n) for n in names]
    g = torch.Generator().manual_seed(1)
    ipt = {n: (torch.rand(p.shape, generator=g) * 1e-3).to(DEVICE, dtype) for n, p in zip(names, params)}
    unc = {n: (torch.rand(p.shape, generator=g) * 1e-3).to(DEVICE, dtype) for n, p in zip(names, params)}
    before = ({n: t.clone() for n, t in ipt.items()}, {n: t.clone() for n, t in unc.items()})
    layer.importance = ImportanceState(*params, ipt, unc, beta1=0.85, beta2=0.8)
    layer(torch.randn(33, 70, device=DEVICE, dtype=dtype)).square().sum().backward()
    scores = []
    for n, p in zip(names, params):
        want_ipt, want_unc = update_importance_ema(before[0][n].float(), before[1][n].float(),
                                                   sensitivity(p.float(), p.grad.float()), 0.85, 0.8)  # fmt: skip
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ipt[n].float(), want_ipt, rtol=tol, atol=tol * want_ipt.abs().max().item())
        torch.testing.assert_close(unc[n].float(), want_unc, rtol=tol, atol=tol * want_unc.abs().max().item())
        scores.append(element_score(want_ipt, want_unc))
    want = triplet_score(*scores)
    torch.testing.assert_close(layer.importance.triplet_score.float(), want, rtol=tol * 2, atol=tol * want.abs().max().item())
