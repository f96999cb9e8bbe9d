"""Layer benchmark: FastSVDLinear vs PEFT's SVDLinear vs the frozen nn.Linear, forward and forward+backward.

On a GPU: bf16, r_init = 12, 8192 tokens, 4096→4096 and 4096→14336, dropout 0
and 0.1 (the shapes of the PEFT baseline in BENCHMARKS.md), and 4096→4096 at 1024, 2048 and 4096 tokens. On a
CPU: small fp32 shapes, enough to exercise the harness. ``adalora_fast_emit`` is the fast layer with the
paper-order sensitivity emitted by every backward: its forward+backward against
``adalora_fast``'s is the cost of emitting the scores.
"""

import pytest
import torch
from tooling.device import DEVICE, ON_GPU

from adalora_fast import dispatch
from adalora_fast.benchmarking import EMITTING_PROVIDER, PROVIDERS, build_layer, layer_step
from bench_common import check_ran_on_kernels, ran_on

CUDA = ON_GPU
DTYPE = torch.bfloat16 if CUDA else torch.float32
# 4096→4096 at several token counts (the report plots layer time against tokens), plus the wide FFN shape.
SHAPES = [(1024, 4096, 4096), (2048, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 14336)] if CUDA else \
    [(128, 256, 256), (512, 256, 256), (300, 77, 130)]
RANK = 12


def _synchronized(fn):
    if not CUDA:
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


CASES = [(p, m) for p in PROVIDERS for m in ("forward", "forward_backward")] + [(EMITTING_PROVIDER, "forward_backward")]


@pytest.mark.parametrize("provider,mode", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_svd_linear_layer(benchmark, provider, mode, dropout, shape):
    tokens, in_f, out_f = shape
    benchmark.group = f"svd_linear {mode} {tokens}x{in_f}->{out_f} r={RANK} dropout={dropout} {str(DTYPE)[6:]}"
    torch.manual_seed(0)
    layer = build_layer(provider, in_f, out_f, RANK, dropout=dropout, dtype=DTYPE, device=DEVICE)
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=DTYPE, requires_grad=True)
    run = _synchronized(layer_step(layer, x, mode))
    dispatch.reset_backend_calls()
    run()  # warm-up (and the smoke test's one call when timing is disabled)
    benchmark.pedantic(run, rounds=20 if CUDA else 5, iterations=1, warmup_rounds=2)
    backend = benchmark.extra_info["adapter_backend"] = ran_on(provider, dispatch.backend_calls()["svd_adapter"])
    check_ran_on_kernels(provider, backend, DEVICE)
    # The layer still computes the right thing after being timed.
    with torch.no_grad():
        y = layer(x[:4])
    assert y.shape == (4, out_f) and torch.isfinite(y).all()
