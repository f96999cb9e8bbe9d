"""The headline: one training step of a Llama-style model with adalora-fast vs PEFT LoRA vs stock PEFT AdaLoRA.

Step = forward (loss + orthogonality penalty), backward, AdamW step, allocator (every step, AdaLoRA only).
On a GPU: bf16, 8×512 tokens, the ~1B (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads)
and ~160M (hidden 768, 12 layers, intermediate 2048) shapes of the PEFT baseline in BENCHMARKS.md, AdaLoRA
init_r 12 / target_r 8 on q,k,v,o,gate,up,down, LoRA r 8 on the same targets, dropout 0 and 0.1; peak memory per step
goes to ``extra_info``. On a GPU also, the whole step captured as one CUDA graph
(:func:`adalora_fast.cuda_graph.capture_training_step`) for adalora-fast (``patch_peft(model,
capturable=True)``) and for PEFT LoRA alike: compare ``adalora_fast_graph`` with ``peft_lora_graph`` too, not
only with eager LoRA, since under a capture transformers builds an explicit causal mask for attention
instead of its packed-sequence check (which reads the device), for both. On a CPU: a tiny model, fp32, as a
smoke test.

The models are built as a user builds them (``get_peft_model`` defaults: fp32 adapters over the bf16 model).
``extra_info["adapter_backend"]`` records what each provider's adapters ran on; on a GPU an adalora-fast
provider that fell back to the reference fails instead of reporting a figure.
"""

import gc
import math

import pytest
import torch
from tooling.device import DEVICE, ON_GPU

from adalora_fast import dispatch
from bench_common import (
    GRAPH_PROVIDERS,
    TRAINING_PROVIDERS,
    check_ran_on_kernels,
    llama_training_model,
    ran_on,
    training_step_runner,
)

CUDA = ON_GPU
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODELS = ["llama_1b", "llama_160m"] if CUDA else ["tiny"]
BATCH, SEQ = (8, 512) if CUDA else (2, 16)
PROVIDERS = TRAINING_PROVIDERS + (GRAPH_PROVIDERS if CUDA else ())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("model_name", MODELS)
def test_training_step(benchmark, model_name, dropout, provider):
    gc.collect()  # the previous test's model (patched models hold reference cycles) must not count in this peak
    if CUDA:
        torch.cuda.empty_cache()
    model = llama_training_model(provider, model_name, dropout=dropout, seq=SEQ, device=DEVICE, dtype=DTYPE)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), device=DEVICE)
    benchmark.group = f"training step {model_name} {BATCH}x{SEQ} tokens dropout={dropout} {str(DTYPE)[6:]}"
    if CUDA:
        torch.cuda.reset_peak_memory_stats()  # before the warm-up (and the capture, whose allocations persist)
    dispatch.reset_backend_calls()
    run, losses = training_step_runner(model, provider, ids)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    benchmark.pedantic(run, rounds=15 if CUDA else 2, iterations=1, warmup_rounds=2)
    if CUDA:
        benchmark.extra_info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    backend = benchmark.extra_info["adapter_backend"] = ran_on(provider, dispatch.backend_calls()["svd_adapter"])
    check_ran_on_kernels(provider, backend, DEVICE)
    # The measured steps trained (a replayed graph too): finite losses, and the adapters moved.
    assert len(losses) > 3 and all(math.isfinite(float(loss)) for loss in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
