"""Achieved HBM bandwidth of the adapter-only Triton kernels (the base GEMMs left out), against the device's peak.

The adapter's kernels are memory-bound (rank ≤ 64): their cost is the bytes they move. Each case
reports GB/s and the fraction of the device's peak in pytest-benchmark's ``extra_info`` and prints it.
GPU only: on a CPU the kernels run in Triton's interpreter, which says nothing about bandwidth.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="bandwidth of the Triton kernels is measured on a GPU")

# Peak HBM bandwidth in GB/s by device name (first match wins).
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)]
SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336)]
RANK, R_PAD = 12, 16


def _peak():
    name = torch.cuda.get_device_name(0)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def _problem(benchmark, shape, direction):
    """(layer, x, its SVDAdapter, a dropout seed) for one bandwidth case, and the case's benchmark group."""
    from adalora_fast import FastSVDLinear
    from adalora_fast.adapter import SVDAdapter
    from adalora_fast.kernels.svd_adapter_launch import dropout_seed

    tokens, in_f, out_f = shape
    layer = FastSVDLinear(in_f, out_f, r=RANK, lora_alpha=16, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    adapter = SVDAdapter(layer.lora_A, layer.lora_E, layer.lora_B, layer.triplet_mask, layer.ranknum, layer.scaling)
    benchmark.group = f"adapter {direction} kernels {tokens}x{in_f}->{out_f} r={RANK} bf16"
    return layer, x, adapter, dropout_seed(0.0, x.device)


def _record(benchmark, nbytes):
    if not benchmark.stats:  # --benchmark-disable: a smoke run, nothing measured
        return
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / 1e9
    peak = _peak()
    benchmark.extra_info.update(gbps=round(gbps, 1), peak_gbps=peak, fraction_of_peak=round(gbps / peak, 3) if peak else None)
    print(f"\n{benchmark.group}: {gbps:.0f} GB/s" + (f" = {gbps / peak:.0%} of {peak:.0f} GB/s peak" if peak else ""))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_forward_kernels_bandwidth(benchmark, shape):
    from adalora_fast.kernels.svd_adapter_launch import svd_adapter_forward

    tokens, in_f, out_f = shape
    layer, x, adapter, seed = _problem(benchmark, shape, "forward")

    def run():
        svd_adapter_forward(x, layer.weight, None, adapter, seed, base_gemm=False)
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
    # y starts as zeros (a write of y; the layer has the base GEMM's output there); shrink reads x and writes H;
    # expand reads H and reads and writes y (A, E, B are negligible).
    _record(benchmark, tokens * in_f * 2 + 2 * tokens * R_PAD * 4 + 3 * tokens * out_f * 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_backward_kernels_bandwidth(benchmark, shape):
    from adalora_fast.kernels.svd_adapter import GRAD_H_BLOCK_M
    from adalora_fast.kernels.svd_adapter_launch import svd_adapter_backward, svd_adapter_forward

    tokens, in_f, out_f = shape
    layer, x, adapter, seed = _problem(benchmark, shape, "backward")
    _, h = svd_adapter_forward(x, layer.weight, None, adapter, seed, base_gemm=False)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)

    def run():
        svd_adapter_backward(dy, x, layer.weight, adapter, h, seed, True, None, base_gemm=False)
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
    n_tiles = -(-tokens // GRAD_H_BLOCK_M)
    # dx starts as zeros (a write; the layer has the base GEMM's dY·W0 there); grad_h reads dY and H, writes Gs
    # and the dB partials; reduce reads them; grad_a_x reads x and Gs and reads and writes dx (its dA partials
    # are small).
    nbytes = tokens * out_f * 2 + 2 * tokens * R_PAD * 4 + 2 * n_tiles * out_f * R_PAD * 4
    nbytes += tokens * in_f * 2 + tokens * R_PAD * 4 + 3 * tokens * in_f * 2
    _record(benchmark, nbytes)
