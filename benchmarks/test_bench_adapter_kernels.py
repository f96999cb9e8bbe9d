"""Achieved HBM bandwidth of the adapter-only Triton kernels (the base GEMMs left out), against the device's peak.

The adapter's kernels are memory-bound (rank ≤ 64): their cost is the bytes they move. Each case reports GB/s
and the fraction of the device's peak in pytest-benchmark's ``extra_info`` and prints it; on a GPU whose peak
is known the bandwidth must reach :data:`MIN_FRACTION_OF_PEAK` of it. Every case also checks that the timed
kernels computed the adapter's term (the fp32 reference's y, or dx, dA, dE, dB): a fast wrong result has no
bandwidth worth reporting. On a CPU the kernels run in Triton's interpreter on a small fp32 case: the results
are checked, and the bandwidth, which says nothing there, is only recorded.
"""

import pytest
import torch
from tooling.device import DEVICE, ON_GPU, TOL, assert_close_to_scale

# Peak HBM bandwidth in GB/s by device name (first match wins).
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)]
# The floor, a fraction of the peak that a correct kernel clears with margin. No adapter-only figure was
# measured yet; on the H200 (BENCHMARKS.md, 2026-11-28) the fast layer at 8192×4096→4096 took at most 0.22 ms
# (forward) and 0.53 ms (backward) more than the frozen layer, host time included: 26 % and 16 % of 4.8 TB/s
# for the bytes counted here (58 % and 30 % at →14336). A kernel that re-reads its operands per tile or spills
# falls several times below.
MIN_FRACTION_OF_PEAK = 0.08
# (The interpreter's bf16 tl.dot is wrong: bf16 runs on a GPU.)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336)] if ON_GPU else [(256, 64, 96)]
RANK, R_PAD = 12, 16


def _peak():
    """The device's peak GB/s, None where it is not known (a CPU, another GPU)."""
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name(0)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def _problem(benchmark, shape, direction):
    """(layer, x, its SVDAdapter, a dropout seed) for one bandwidth case, and the case's benchmark group."""
    from adalora_fast import FastSVDLinear
    from adalora_fast.adapter import SVDAdapter
    from adalora_fast.kernels.svd_adapter_op import dropout_seed

    tokens, in_f, out_f = shape
    layer = FastSVDLinear(in_f, out_f, r=RANK, lora_alpha=16, bias=False, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(tokens, in_f, device=DEVICE, dtype=DTYPE)
    adapter = SVDAdapter(layer.lora_A, layer.lora_E, layer.lora_B, layer.triplet_mask, layer.scaling, layer.ranknum)
    benchmark.group = f"adapter {direction} kernels {tokens}x{in_f}->{out_f} r={RANK} {str(DTYPE)[6:]}"
    return layer, x, adapter, dropout_seed(0.0, x.device)


def _reference(x, adapter, dy=None):
    """The adapter's term in fp32 from the same tensors, and with ``dy`` its gradients (dx, dA, dE, dB)."""
    from adalora_fast.reference import svd_adapter_reference

    x, *factors = (t.detach().float().requires_grad_(dy is not None) for t in (x, *adapter.factors))
    y = svd_adapter_reference(x, *factors, adapter.triplet_mask, adapter.scaling, adapter.ranknum)
    if dy is None:
        return y.detach()
    y.backward(dy.float())
    return [t.grad for t in (x, *factors)]


def _check(results, expected, what):
    y_tol, param_tol = TOL[(DTYPE, DTYPE, None)]
    for name, got, want in zip(what, results, expected):
        assert_close_to_scale(got, want, y_tol if name in ("y", "dx") else param_tol, name)


def _record(benchmark, nbytes):
    """GB/s and the fraction of the peak into extra_info, printed; on a GPU of known peak, at least the floor."""
    if not benchmark.stats:  # --benchmark-disable: a smoke run, nothing measured
        return
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / 1e9
    peak = _peak()
    benchmark.extra_info.update(gbps=round(gbps, 1), peak_gbps=peak, fraction_of_peak=round(gbps / peak, 3) if peak else None)
    print(f"\n{benchmark.group}: {gbps:.0f} GB/s" + (f" = {gbps / peak:.0%} of {peak:.0f} GB/s peak" if peak else ""))
    if peak is not None:
        assert gbps >= MIN_FRACTION_OF_PEAK * peak, (
            f"{benchmark.group}: {gbps:.0f} GB/s, below {MIN_FRACTION_OF_PEAK:.0%} of this device's {peak:.0f} GB/s peak")


def _synchronized(fn):
    def run():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_forward_kernels_bandwidth(benchmark, shape):
    from adalora_fast.kernels.svd_adapter_op import svd_adapter_forward

    tokens, in_f, out_f = shape
    _, x, adapter, seed = _problem(benchmark, shape, "forward")

    def adapter_term():  # onto zeros: the adapter's kernels alone
        y = torch.zeros(tokens, out_f, device=DEVICE, dtype=DTYPE)
        svd_adapter_forward(x, adapter, seed, y)
        return y

    run = _synchronized(adapter_term)
    run()
    benchmark.pedantic(run, rounds=50 if ON_GPU else 3, iterations=1, warmup_rounds=5 if ON_GPU else 1)
    y = run()
    _check([y], [_reference(x, adapter)], ["y"])
    # y starts as zeros (a write of y; the layer has the base GEMM's output there); shrink reads x and writes H;
    # expand reads H and reads and writes y (A, E, B are negligible).
    _record(benchmark, tokens * in_f * 2 + 2 * tokens * R_PAD * 4 + 3 * tokens * out_f * 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adapter_backward_kernels_bandwidth(benchmark, shape):
    from adalora_fast.kernels.svd_adapter import GRAD_H_BLOCK_M
    from adalora_fast.kernels.svd_adapter_op import svd_adapter_backward, svd_adapter_forward

    tokens, in_f, out_f = shape
    _, x, adapter, seed = _problem(benchmark, shape, "backward")
    h = svd_adapter_forward(x, adapter, seed, torch.zeros(tokens, out_f, device=DEVICE, dtype=DTYPE))
    dy = torch.randn(tokens, out_f, device=DEVICE, dtype=DTYPE)
    # onto zeros: the adapter's kernels alone
    run = _synchronized(lambda: svd_adapter_backward(dy, x, adapter, h, seed, torch.zeros_like(x)))
    run()
    benchmark.pedantic(run, rounds=50 if ON_GPU else 3, iterations=1, warmup_rounds=5 if ON_GPU else 1)
    _check(run(), _reference(x, adapter, dy), ["dx", "dA", "dE", "dB"])
    n_tiles = -(-tokens // GRAD_H_BLOCK_M)
    # dx starts as zeros (a write; the layer has the base GEMM's dY·W0 there); grad_h reads dY and H, writes Gs
    # and the dB partials; reduce reads them; grad_a_x reads x and Gs and reads and writes dx (its dA partials
    # are small).
    nbytes = tokens * out_f * 2 + 2 * tokens * R_PAD * 4 + 2 * n_tiles * out_f * R_PAD * 4
    nbytes += tokens * in_f * 2 + tokens * R_PAD * 4 + 3 * tokens * in_f * 2
    _record(benchmark, nbytes)
