"""The headline: one training step of a Llama-style model with adalora-fast vs PEFT LoRA vs stock PEFT AdaLoRA.

Step = forward (loss + orthogonality penalty), backward, AdamW step, allocator (every step, AdaLoRA only).
On a GPU: bf16, 8×512 tokens, the ~1B (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV heads)
and ~160M (hidden 768, 12 layers, intermediate 2048) shapes of ``../shared/baselines``, AdaLoRA init_r 12 /
target_r 8 on q,k,v,o,gate,up,down, LoRA r 8 on the same targets, dropout 0 and 0.1; peak memory per step
goes to ``extra_info``. On a GPU also, the whole step captured as one CUDA graph
(:func:`adalora_fast.cuda_graph.capture_training_step`) for adalora-fast (``patch_peft(model,
capturable=True)``) and for PEFT LoRA alike: compare ``adalora_fast_graph`` with ``peft_lora_graph`` too, not
only with eager LoRA, since under a capture transformers builds an explicit causal mask for attention
instead of its packed-sequence check (which reads the device), for both. On a CPU: a tiny model, fp32, as a
smoke test.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if CUDA:
    MODELS = {
        "llama_1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000),
        "llama_160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=12, vocab_size=32000),
    }  # fmt: skip
    BATCH, SEQ = 8, 512
else:
    MODELS = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=256)}  # fmt: skip
    BATCH, SEQ = 2, 16
PROVIDERS = ("peft_lora", "peft_adalora", "adalora_fast") + (("peft_lora_graph", "adalora_fast_graph") if CUDA else ())


def _build(provider, model_cfg, dropout):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import adalora_fast

    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialised where it runs: a ~1B model's random init on a CPU takes long
        base = LlamaForCausalLM(LlamaConfig(**model_cfg, max_position_embeddings=SEQ)).to(DTYPE)
    if provider.startswith("peft_lora"):
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout,
                                               task_type="CAUSAL_LM"))  # fmt: skip
    cfg = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout, tinit=0,
                        tfinal=0, deltaT=1, total_step=10_000, orth_reg_weight=0.5, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, cfg)
    if provider.startswith("adalora_fast"):
        return adalora_fast.patch_peft(model, capturable=provider.endswith("_graph"))
    return model


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_step(benchmark, model_name, dropout, provider):
    from adalora_fast.cuda_graph import capture_training_step

    model = _build(provider, MODELS[model_name], dropout)
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (BATCH, SEQ), device=DEVICE)
    graphed = provider.endswith("_graph")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, capturable=graphed)
    step = [0]
    benchmark.group = f"training step {model_name} {BATCH}x{SEQ} tokens dropout={dropout} {str(DTYPE)[6:]}"

    def train_step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        if not provider.startswith("peft_lora"):
            model.base_model.update_and_allocate(step[0])
        step[0] += 1
        return loss.detach()

    if graphed:  # three real steps, then the fourth captured: every round replays it
        captured = capture_training_step(train_step, [opt])
        losses = captured.warmup_outputs

        def run():
            losses.append(captured().clone())
            torch.cuda.synchronize()

    else:
        losses = []

        def run():
            losses.append(train_step())
            opt.zero_grad(set_to_none=True)
            if CUDA:
                torch.cuda.synchronize()

        for _ in range(3):
            run()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=15 if CUDA else 2, iterations=1, warmup_rounds=2)
    if CUDA:
        benchmark.extra_info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    assert len(losses) > 3 and all(torch.isfinite(loss) for loss in losses)  # warm-up steps, then the measured ones
