"""The main job: a small transformer fine-tuned with AdaLoRA learns, and the allocator prunes to budget."""

from adalora_fast import FastSVDLinear
from adalora_fast.demo import TinyTransformer, main, train


def test_demo_trains_and_allocates():
    losses, ranks, model = train(steps=120, init_r=6, target_r=3, quiet=True)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2  # it learns
    assert len(ranks) == 13 and sum(ranks.values()) <= 3 * 13  # every linear adapted; final budget reached
    assert len(set(ranks.values())) > 1  # ranks are allocated unevenly
    assert all(isinstance(m, FastSVDLinear) for m in model.modules() if type(m).__name__.endswith("Linear"))
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []


def test_demo_cli_prints_loss_ranks_and_timings(capsys):
    result = main(["--steps", "40", "--init-r", "4", "--target-r", "2", "--bench-iters", "2"])
    out = capsys.readouterr().out
    assert "ranks allocated per layer" in out and "layer timing" in out
    assert {r["provider"] for r in result["timings"]} == {"adalora_fast", "peft_svdlinear", "frozen_linear"}
    assert all(r["ms"] > 0 for r in result["timings"])


def test_tiny_transformer_has_thirteen_linear_layers():
    import torch.nn as nn

    assert sum(isinstance(m, nn.Linear) for m in TinyTransformer().modules()) == 13
