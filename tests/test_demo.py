"""The main job: a small transformer fine-tuned with AdaLoRA learns, and the allocator prunes to budget."""

import torch

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
    assert {r["provider"] for r in result["timings"]} == {"adalora_fast", "peft_svdlinear", "frozen_linear"}
    assert all(r["ms"] > 0 for r in result["timings"])
    # Where the adapter ran the reference, the demo says so, why the table shows no speed-up, and where GPU figures are.
    if result["adapter_backend"] == "reference":
        flat = " ".join(out.split())
        assert "adapter on the PyTorch reference" in flat
        assert "ran its PyTorch reference here" in flat and "no speed-up is expected" in flat
        assert "BENCHMARKS.md" in flat


def test_demo_takes_the_path_from_the_dispatcher(monkeypatch):
    """The message follows the dispatcher's choice, not the device: forced reference, forced kernels (the
    interpreter on a CPU), and the automatic choice on this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    backend, reason = adapter_path(device, torch.float32)
    assert backend == "reference" and "ADALORA_FAST_BACKEND=reference" in reason
    note = path_note(backend, reason)
    assert "ADALORA_FAST_BACKEND=reference" in note and "no speed-up" in note and "BENCHMARKS.md" in note

    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")  # TRITON_INTERPRET=1 on a CPU (tests/conftest.py)
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
