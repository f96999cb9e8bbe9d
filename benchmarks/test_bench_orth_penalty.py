"""Orthogonality penalty, forward+backward, for every adapter of a model: the compiled op vs PEFT's loop.

On a GPU: 154 modules shaped like a ~1B Llama (hidden 2048, intermediate 5632,
4 KV heads of 64, 22 layers, r = 12), bf16. On a CPU: 2 such layers at hidden
256, fp32. ``peft_loop`` is PEFT's per-matrix loop (``AdaLoraModel.forward``),
i.e. the reference path. On a CPU the dispatcher runs that reference and this
times the extension's CPU build (``backend="extension"``) against it; neither is
faster everywhere there (one thread: level on these shapes, the reference ahead
on larger models; two threads: the extension ahead): figures in BENCHMARKS.md.
"""

import pytest
import torch
from tooling.device import DEVICE, ON_GPU

from adalora_fast import dispatch
from adalora_fast.penalty import orth_penalty
from adalora_fast.reference import orth_penalty_sum

CUDA = ON_GPU
DTYPE = torch.bfloat16 if CUDA else torch.float32
HIDDEN, INTER, KV, LAYERS = (2048, 5632, 256, 22) if CUDA else (256, 704, 64, 2)
RANK = 12
# (in, out) of q, k, v, o, gate, up, down
MODULE_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]


def _factors():
    g = torch.Generator().manual_seed(0)
    factors, is_right = [], []
    for _ in range(LAYERS):
        for in_f, out_f in MODULE_SHAPES:
            factors += [torch.randn(RANK, in_f, generator=g) * 0.02, torch.randn(out_f, RANK, generator=g) * 0.02]
            is_right += [True, False]
    return [f.to(DEVICE, DTYPE).requires_grad_() for f in factors], is_right


def _peft_loop(factors, is_right):
    return orth_penalty_sum(list(zip(factors, is_right))) / len(factors)


def _extension(factors, is_right):
    return orth_penalty(factors, is_right, backend="extension")


PROVIDERS = {"adalora_fast": _extension, "peft_loop": _peft_loop}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_orth_penalty_all_modules(benchmark, provider):
    factors, is_right = _factors()
    if provider == "adalora_fast":
        assert dispatch.penalty_backend(factors[0], "extension") == "extension"
    benchmark.group = f"orth_penalty fwd+bwd {len(factors) // 2} modules r={RANK} {str(DTYPE)[6:]}"
    fn = PROVIDERS[provider]

    def run():
        for f in factors:
            f.grad = None
        fn(factors, is_right).backward()
        if CUDA:
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=50 if CUDA else 5, iterations=1, warmup_rounds=3)
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in factors)
