"""One allocator step (score update, threshold, masking) for every adapter of a model: adalora-fast vs PEFT.

On a GPU: 154 modules shaped like a ~1B Llama (hidden 2048, intermediate 5632, 4 KV heads of 64,
22 layers, init_r 12), bf16. On a CPU: 2 such layers at hidden 256, fp32. Both allocators score the
same gradients at a budgeting step that masks. ``peft_update_and_allocate`` is PEFT's
``RankAllocator.update_and_allocate`` on PEFT's own SVDLinear layers.
"""

import pytest
import torch
import torch.nn as nn

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
HIDDEN, INTER, KV, LAYERS = (2048, 5632, 256, 22) if CUDA else (256, 704, 64, 2)
NAMES = ["q", "k", "v", "o", "gate", "up", "down"]
SHAPES = dict(q=(HIDDEN, HIDDEN), k=(HIDDEN, KV), v=(HIDDEN, KV), o=(HIDDEN, HIDDEN), gate=(HIDDEN, INTER),
              up=(HIDDEN, INTER), down=(INTER, HIDDEN))  # fmt: skip
TOTAL, TINIT, TFINAL, STEP = 1000, 10, 100, 100


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        for n in NAMES:
            setattr(self, n, nn.Linear(*SHAPES[n], bias=False))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(LAYERS))


def _with_grads(model):
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=p.device, dtype=p.dtype)
    return model


def _fast():
    from adalora_fast import RankAllocator, convert_linear_layers

    model = _Model()
    convert_linear_layers(model, r=12, lora_alpha=12)
    model = _with_grads(model.to(DEVICE, DTYPE))
    alloc = RankAllocator(model, 12, 8, TINIT, TFINAL, 1, 0.85, 0.85, total_step=TOTAL, semantics="peft")
    return lambda: alloc.update_and_mask(model, STEP)


def _peft():
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=12, target_r=8, tinit=TINIT, tfinal=TFINAL, deltaT=1, total_step=TOTAL, target_modules=NAMES)
    model = _with_grads(get_peft_model(_Model(), cfg).to(DEVICE, DTYPE))
    return lambda: model.base_model.update_and_allocate(STEP)


PROVIDERS = {"adalora_fast": _fast, "peft_update_and_allocate": _peft}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_allocator_step(benchmark, provider):
    benchmark.group = f"allocator step {LAYERS * len(NAMES)} modules r=12 {str(DTYPE)[6:]}"
    step = PROVIDERS[provider]()

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30 if CUDA else 5, iterations=1, warmup_rounds=2)
