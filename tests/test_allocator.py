"""The reference rank allocator against PEFT's RankAllocator, and the schedule's exact edges."""

import pytest
import torch

from adalora_fast import RankAllocator, compute_orth_regu
from adalora_fast.discovery import find_adapter_triplets
from adalora_fast.reference import BudgetSchedule, ReferenceRankAllocator, masking_threshold
from helpers import clone, peft_mlp


def _train_step(model, opt, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y) + compute_orth_regu(model, 0.1)
    loss.backward()
    opt.step()
    return loss.detach()


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lora_E(model):
    model = model.base_model.model  # PEFT names parameters from the wrapped model
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}


@pytest.mark.parametrize("deltaT,tinit,tfinal,total", [(1, 20, 40, 200), (10, 15, 50, 215), (3, 10, 15, 70)])
def test_step_for_step_parity_with_peft(deltaT, tinit, tfinal, total):
    cfg = dict(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=deltaT, beta1=0.85, beta2=0.85)
    peft_model = peft_mlp(**cfg)
    ours = clone(peft_model)
    allocator = RankAllocator(
        ours.base_model.model, lora_r=12, target_rank=8, init_warmup=tinit, final_warmup=tfinal, mask_interval=deltaT,
        beta1=0.85, beta2=0.85, total_step=total, adapter_name="default", semantics="peft",
    )  # fmt: skip
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
    peft_cfg = peft_model.peft_config["default"]
    masked_steps, regrown = 0, False
    for step in range(total):
        x, y = torch.randn(16, 16), torch.randn(16, 8)
        l_p = _train_step(peft_model, opt_p, x, y)
        l_o = _train_step(ours, opt_o, x, y)
        assert torch.equal(l_p, l_o), f"loss differs at step {step}"
        before = _lora_E(ours)
        peft_model.base_model.update_and_allocate(step)
        _, threshold = allocator.update_and_mask(ours, step)
        masked_steps += threshold is not None
        assert _same_tensors(_lora_E(peft_model), _lora_E(ours)), f"Λ differs at step {step}"
        assert allocator.rank_pattern == peft_cfg.rank_pattern, f"rank_pattern differs at step {step}"
        # A pruned λ regrows through its gradient between masking events (deltaT > 1).
        if deltaT > 1 and allocator.rank_pattern and threshold is None and step < total - tfinal:
            pruned = [(n, ~torch.tensor(k)) for n, k in allocator.rank_pattern.items()]
            regrown |= any(bool((before[n].view(-1)[m] != 0).any()) for n, m in pruned)
        peft_model.zero_grad()
        ours.zero_grad()
    assert masked_steps > 3
    assert sum(sum(v) for v in allocator.rank_pattern.values()) <= 16  # target budget reached
    assert regrown or deltaT == 1


def test_loralib_semantics_differs_from_peft_only_at_the_final_boundary():
    # T - tfinal = 55 is not a multiple of deltaT = 3: loralib does not mask there, PEFT forces a mask.
    kwargs = dict(lora_r=12, target_rank=8, init_warmup=10, final_warmup=15, mask_interval=3, beta1=0.85, beta2=0.85)
    model_p, model_l = peft_mlp(), peft_mlp()
    alloc_p = RankAllocator(model_p, **kwargs, total_step=70, semantics="peft")
    alloc_l = RankAllocator(model_l, **kwargs, total_step=70, semantics="loralib")
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model_p, model_l)]
    for step in range(70):
        x, y = torch.randn(8, 16), torch.randn(8, 8)
        for m, o, a in zip((model_p, model_l), opts, (alloc_p, alloc_l)):
            _train_step(m, o, x, y)
            _, thr = a.update_and_mask(m, step)
            if step == 55:
                assert (thr is None) == (a.semantics == "loralib")
            if step > 55:
                assert thr is not None or a.semantics == "peft"
            m.zero_grad()
        if step != 55:
            assert alloc_p.rank_pattern == alloc_l.rank_pattern, step
        if step < 55:
            assert _same_tensors(_lora_E(model_p), _lora_E(model_l))


def test_schedule_matches_peft_budget_schedule_at_every_step():
    from peft.tuners.adalora import RankAllocator as PeftRankAllocator

    model = peft_mlp(tinit=7, tfinal=11, total_step=57, deltaT=4)
    peft_alloc = PeftRankAllocator(model, model.peft_config["default"], "default")
    ours = BudgetSchedule(init_bgt=24, target_bgt=16, tinit=7, tfinal=11, total_step=57, deltaT=4)
    assert (peft_alloc.init_bgt, peft_alloc.target_bgt) == (24, 16)
    for step in range(-1, 70):
        assert ours(step) == peft_alloc.budget_schedule(step), step


def test_schedule_phase_boundaries_and_truncation():
    s = BudgetSchedule(init_bgt=100, target_bgt=10, tinit=10, tfinal=20, total_step=110, deltaT=5)
    assert s(10) == (100, False)  # step <= tinit: warm-up, no mask
    assert s(90) == (10, True)  # step == T - tfinal: still the cubic branch (budget = target)
    assert s(91) == (10, True)  # step > T - tfinal: final phase, mask every step
    b, mask = s(11)
    assert b == int(90 * (1 - 1 / 80) ** 3 + 10) and not mask  # int() truncates; 11 % 5 != 0
    assert s(15)[1] and not s(16)[1]


def test_threshold_prunes_every_tie():
    scores = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.9, 0.3])
    thr = masking_threshold(scores, 2)
    assert thr == 0.1
    assert int((scores > thr).sum()) == 3  # three ties at the threshold are all pruned, not just two


def test_final_phase_without_an_earlier_mask_computes_one():
    # PEFT crashes here (rank_pattern is None); the reference masks from the scores.
    model = peft_mlp()
    triplets = find_adapter_triplets(model, "default")
    sched = BudgetSchedule(init_bgt=24, target_bgt=16, tinit=0, tfinal=5, total_step=10, deltaT=1)
    alloc = ReferenceRankAllocator(triplets, sched, 0.85, 0.85, semantics="peft")
    torch.nn.functional.mse_loss(model(torch.randn(4, 16)), torch.randn(4, 8)).backward()
    alloc.update_ipt()
    _, thr = alloc.step(7)
    assert thr is not None and sum(sum(k) for k in alloc.rank_pattern().values()) <= 16


def test_rank_pattern_uses_peft_keys_for_loralib_style_models():
    from adalora_fast import FastSVDLinear

    model = torch.nn.Sequential(FastSVDLinear(6, 6, r=4), FastSVDLinear(6, 3, r=4))
    alloc = RankAllocator(model, 4, 2, 0, 2, 1, 0.85, 0.85, total_step=10)
    with torch.no_grad():
        for m in model:
            m.lora_E.normal_()
    model(torch.randn(5, 6)).sum().backward()
    alloc.update_and_mask(model, 3)
    assert set(alloc.rank_pattern) == {"0.lora_E", "1.lora_E"}
    assert all(len(v) == 4 and all(isinstance(b, bool) for b in v) for v in alloc.rank_pattern.values())
    assert alloc.ranks() == {n: sum(v) for n, v in alloc.rank_pattern.items()}
