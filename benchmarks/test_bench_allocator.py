"""One allocator step (score update, threshold, masking) for every adapter of a model: adalora-fast vs PEFT.

On a GPU: 154 modules shaped like a ~1B Llama (hidden 2048, intermediate 5632, 4 KV heads of 64,
22 layers, init_r 12), bf16. On a CPU: 2 such layers at hidden 256, fp32. Both allocators score the
same gradients (drawn per parameter name) at a budgeting step that masks. ``peft_update_and_allocate`` is
PEFT's ``RankAllocator.update_and_allocate`` on PEFT's own SVDLinear layers.

What was timed must be the step itself: after the timed steps each provider keeps the schedule's budget of
triplets; adalora-fast's step is the same ops for any number of adapters (its flat state: the speed-up this
measures), and, in fp32, it masks the same triplets as PEFT after as many steps.
"""

import collections
import zlib

import pytest
import torch
import torch.nn as nn
from tooling.device import DEVICE, ON_GPU
from torch.utils._python_dispatch import TorchDispatchMode

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HIDDEN, INTER, KV, LAYERS = (2048, 5632, 256, 22) if ON_GPU else (256, 704, 64, 2)
NAMES = ["q", "k", "v", "o", "gate", "up", "down"]
SHAPES = dict(q=(HIDDEN, HIDDEN), k=(HIDDEN, KV), v=(HIDDEN, KV), o=(HIDDEN, HIDDEN), gate=(HIDDEN, INTER),
              up=(HIDDEN, INTER), down=(INTER, HIDDEN))  # fmt: skip
INIT_R, TARGET_R = 12, 8
TOTAL, TINIT, TFINAL, STEP = 1000, 10, 100, 100


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        for n in NAMES:
            setattr(self, n, nn.Linear(*SHAPES[n], bias=False))


class _Model(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(layers))


def _canonical(name: str) -> str:
    """A parameter's name as both models have it (PEFT's wraps it: base_model.model.<name>.default)."""
    return name.removeprefix("base_model.model.").removesuffix(".default")


def _with_grads(model):
    for n, p in model.named_parameters():
        if "lora_" in n:
            g = torch.Generator().manual_seed(zlib.crc32(_canonical(n).encode()))  # the same in both models
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=p.device, dtype=p.dtype)
    return model


def _fast(layers: int = LAYERS):
    from adalora_fast import RankAllocator, convert_linear_layers

    model = _Model(layers)
    convert_linear_layers(model, r=INIT_R, lora_alpha=12)
    model = _with_grads(model.to(DEVICE, DTYPE))
    alloc = RankAllocator(model, INIT_R, TARGET_R, TINIT, TFINAL, 1, 0.85, 0.85, total_step=TOTAL, semantics="peft")
    return model, lambda: alloc.update_and_mask(model, STEP)


def _peft(layers: int = LAYERS):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=1, total_step=TOTAL,
                        target_modules=NAMES)  # fmt: skip
    model = _with_grads(get_peft_model(_Model(layers), cfg).to(DEVICE, DTYPE))
    return model, lambda: model.base_model.update_and_allocate(STEP)


PROVIDERS = {"adalora_fast": _fast, "peft_update_and_allocate": _peft}


def _budget(step: int, modules: int) -> tuple[int, int]:
    """(this step's budget, the final one): AdaLoRA's cubic schedule between the warm-ups (the paper's, PEFT's)."""
    init, target = INIT_R * modules, TARGET_R * modules
    progress = (step - TINIT) / (TOTAL - TINIT - TFINAL)
    return int(target + (init - target) * (1 - progress) ** 3), target


def _kept(model) -> dict[str, list[bool]]:
    """Each adapter's kept triplets: both allocators mask a triplet by zeroing its Λ."""
    return {_canonical(n): (p != 0).flatten().tolist() for n, p in model.named_parameters() if "lora_E" in n}


class _OpCount(TorchDispatchMode):
    """The aten ops run under it (a foreach op over many tensors is one)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops(step) -> collections.Counter:
    with _OpCount() as count:
        step()
    return count.ops


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_allocator_step(benchmark, provider):
    modules = LAYERS * len(NAMES)
    benchmark.group = f"allocator step {modules} modules r={INIT_R} {str(DTYPE)[6:]}"
    model, step = PROVIDERS[provider]()
    steps = 0

    def run():
        nonlocal steps
        step()
        steps += 1
        if ON_GPU:
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30 if ON_GPU else 5, iterations=1, warmup_rounds=2)
    # The timed step masked to the budget (fp32 scores do not tie; bf16 ones can, and a tie at the threshold
    # is pruned with it: then fewer are kept, but never fewer than the final budget).
    kept = sum(map(sum, _kept(model).values()))
    budget, final = _budget(STEP, modules)
    assert kept == budget if DTYPE == torch.float32 else final <= kept <= budget, f"kept {kept}, the budget is {budget}"
    if provider != "adalora_fast":
        return
    if DTYPE == torch.float32:  # the same triplets as PEFT after as many steps on the same gradients
        peft_model, peft_step = _peft()
        for _ in range(steps):
            peft_step()
        assert _kept(model) == _kept(peft_model)
    # The flat state: one step is the same ops for one layer's adapters as for the whole model's.
    _, one_layer = _fast(layers=1)
    one_layer()
    ops, ops_one_layer = _ops(step), _ops(one_layer)
    assert ops == ops_one_layer, f"{sum(ops.values())} ops for {modules} modules, {sum(ops_one_layer.values())} for {len(NAMES)}"
