"""Swapping ``import loralib`` for ``adalora_fast`` reproduces a loralib training run: same losses, same ranks."""

import torch
import torch.nn as nn

import adalora_fast
from loralib_oracle import OracleRankAllocator, OracleSVDLinear, oracle_orth_regu


def _model(layer_cls, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(layer_cls(20, 24, r=6, lora_alpha=12), nn.GELU(), layer_cls(24, 10, r=6, lora_alpha=12))


def test_loralib_training_run_is_reproduced():
    fast = _model(adalora_fast.FastSVDLinear)
    oracle = _model(OracleSVDLinear)
    oracle.load_state_dict(fast.state_dict())  # the same keys: the state dict loads both ways
    with torch.no_grad():
        for m_f, m_o in zip(fast, oracle):
            if isinstance(m_f, adalora_fast.FastSVDLinear):
                m_f.lora_E.normal_(std=0.3)
                m_o.lora_E.copy_(m_f.lora_E)
    kw = dict(lora_r=6, target_rank=3, init_warmup=10, final_warmup=30, mask_interval=4, beta1=0.85, beta2=0.85, total_step=150)
    alloc_f, alloc_o = adalora_fast.RankAllocator(fast, **kw), OracleRankAllocator(oracle, **kw)
    opt_f = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=5e-3)
    opt_o = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=5e-3)
    last_ranks = None
    for step in range(150):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 20, generator=g), torch.randn(32, 10, generator=g)
        loss_f = nn.functional.mse_loss(fast(x), y) + adalora_fast.compute_orth_regu(fast, regu_weight=0.1)
        loss_o = nn.functional.mse_loss(oracle(x), y) + oracle_orth_regu(oracle, regu_weight=0.1)
        assert torch.equal(loss_f, loss_o), step
        loss_f.backward()
        loss_o.backward()
        opt_f.step()
        opt_o.step()
        _, threshold = alloc_f.update_and_mask(fast, step)
        ranks = alloc_o.update_and_mask(oracle, step)
        if ranks is not None:
            assert threshold is not None and alloc_f.ranks() == ranks, step
            last_ranks = ranks
        else:
            assert threshold is None, step
        for m_f, m_o in zip(fast, oracle):
            if isinstance(m_f, adalora_fast.FastSVDLinear):
                assert torch.equal(m_f.lora_E, m_o.lora_E), step
        opt_f.zero_grad()
        opt_o.zero_grad()
    assert sum(last_ranks.values()) <= 6
