"""The main job: a small transformer fine-tuned with AdaLoRA learns, and the allocator prunes to budget."""

import pytest
import torch
from tooling.device import DEVICE, ON_GPU

from adalora_fast import FastSVDLinear
from adalora_fast.demo import TinyTransformer, adapter_path, main, path_note, train


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
    assert {r["provider"] for r in result["timings"]} == {"adalora_fast", "peft_lora", "peft_svdlinear", "frozen_linear"}
    assert all(r["ms"] > 0 for r in result["timings"])
    flat = " ".join(out.split())
    assert "BENCHMARKS.md" in flat
    if ON_GPU:  # the demo trains on the GPU, where the dispatcher picks the kernels
        assert result["adapter_backend"] == "triton", result["adapter_backend"]
        assert "ran the fused Triton kernels" in flat and "no speed-up" not in flat
    else:  # the reference, and the demo says so and why the table shows no speed-up
        assert result["adapter_backend"] == "reference", result["adapter_backend"]
        assert "adapter on the PyTorch reference" in flat
        assert "ran its PyTorch reference here" in flat and "no speed-up is expected" in flat


@pytest.mark.automatic_dispatch
def test_demo_takes_the_path_from_the_dispatcher(monkeypatch):
    """The message follows the dispatcher's choice, not the device: forced reference, forced kernels (the
    interpreter on a CPU), and the automatic choice on this machine."""
    device = DEVICE  # (a decision only: nothing is launched)
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    backend, reason = adapter_path(device, torch.float32)
    assert backend == "reference" and "ADALORA_FAST_BACKEND=reference" in reason
    note = path_note(backend, reason)
    assert "ADALORA_FAST_BACKEND=reference" in note and "no speed-up" in note and "BENCHMARKS.md" in note

    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")
    assert adapter_path(device, torch.float32) == ("triton", None)
    note = path_note("triton", None)
    assert "fused Triton kernels" in note and "no speed-up" not in note and "BENCHMARKS.md" in note

    monkeypatch.delenv("ADALORA_FAST_BACKEND")
    backend, reason = adapter_path(device, torch.float32)
    assert backend == ("triton" if device == "cuda" else "reference")
    assert (reason is None) == (backend == "triton")
    if device == "cpu":
        assert "cpu" in reason


def test_tiny_transformer_has_thirteen_linear_layers():
    import torch.nn as nn

    assert sum(isinstance(m, nn.Linear) for m in TinyTransformer().modules()) == 13
