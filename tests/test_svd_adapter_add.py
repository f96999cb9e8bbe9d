"""The adapter's kernels onto any base layer's output (``dispatch.svd_adapter_add``: QLoRA's bitsandbytes
layers, GPTQ, ``nn.Linear`` subclasses) against the PyTorch reference: the output and its dtype, dx (the base's
own plus the adapter's), dA, dE, dB, on awkward shapes, per-dtype tolerances (``TOL``).

The base here is a differentiable function of x computed outside the op (as a quantized layer's matmul is),
so dx checks that the op's backward adds the adapter's part to the base's own.
"""

import pytest
import torch
from tooling.device import BF16, DEVICE, F16, F32, KERNEL_DTYPES, TOL, assert_close_to_scale

from adalora_fast import dispatch
from adalora_fast.adapter import SVDAdapter
from adalora_fast.kernels.svd_adapter_op import svd_adapter_dropout_mask
from adalora_fast.reference import svd_adapter_add_reference

ALPHA = 8.0
# (x shape, in, out, r): N = 1, ranks 1, 12, 16 and 64, dims not multiples of 16, a 3-D input
CASES = [((1, 45), 45, 29, 12), ((37, 45), 45, 29, 1), ((2, 9, 64), 64, 77, 12), ((33, 130), 130, 16, 16),
         ((20, 40), 40, 50, 64)]  # fmt: skip


def _adapter_tensors(in_f, out_f, r, param_dtype, seed=0, all_masked=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    A = torch.randn(r, in_f, generator=g) / in_f**0.5
    E = torch.randn(r, 1, generator=g)
    B = torch.randn(out_f, r, generator=g) / r**0.5
    mask = torch.zeros(r) if all_masked else (torch.rand(r, generator=g) > 0.25).float()
    to = dict(device=DEVICE, dtype=param_dtype)
    A, E, B = (t.to(**to).requires_grad_() for t in (A, E, B))
    return W.to(DEVICE), A, E, B, mask.to(**to), torch.tensor([float(r)], **to)


def _compare(x, tensors, out_dtype=None, dropout_p=0.0, seed=1234, autocast=None):
    W, A, E, B, mask, ranknum = tensors
    out_tol, grad_tol = TOL[(x.dtype, A.dtype, autocast)]
    n, k = x.numel() // x.shape[-1], x.shape[-1]
    keep = svd_adapter_dropout_mask(seed, n, k, dropout_p, x.device).view(x.shape)
    g = torch.Generator().manual_seed(7)

    def base(x):  # a base layer's own differentiable computation, in x's dtype
        return torch.tanh(x @ W.to(x.dtype).T)

    def fast(x):
        adapter = SVDAdapter(A, E, B, mask, ALPHA, ranknum, dropout_p=dropout_p)
        return dispatch.svd_adapter_add(base(x), x, adapter, out_dtype, seed=seed)

    def ref(x):
        return svd_adapter_add_reference(base(x), x, A, E, B, mask, ALPHA, ranknum, out_dtype=out_dtype,
                                         dropout_p=dropout_p, dropout_keep=keep)  # fmt: skip

    runs = []
    for fn in (fast, ref):
        xi = x.detach().clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=autocast or BF16, enabled=autocast is not None):
            y = fn(xi)
            base_dtype = base(x).dtype
        dy = torch.randn(y.shape, generator=g.manual_seed(7)).to(DEVICE, y.dtype)
        y.backward(dy)
        runs.append((y.detach(), [xi.grad] + [t.grad.clone() for t in (A, E, B)]))
        for t in (A, E, B):
            t.grad = None
    (y, grads), (y_ref, grads_ref) = runs
    assert y.dtype == y_ref.dtype == (out_dtype or base_dtype) and y.shape == y_ref.shape
    assert_close_to_scale(y, y_ref, out_tol, "y")
    for name, a, r in zip(("dx", "dA", "dE", "dB"), grads, grads_ref):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_close_to_scale(a, r, out_tol if name == "dx" else grad_tol, name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,in_f,out_f,r", CASES)
def test_matches_reference(kernels, x_shape, in_f, out_f, r, dtype, dropout_p):
    x = torch.randn(x_shape, device=DEVICE, dtype=dtype)
    _compare(x, _adapter_tensors(in_f, out_f, r, dtype), dropout_p=dropout_p)


@pytest.mark.parametrize("x_dtype", [F16, BF16], ids=str)  # (fp32 products: right in the interpreter too)
@pytest.mark.parametrize("out_dtype", [None, F32], ids=["base output's dtype", "promoted to fp32"])
def test_half_activations_over_fp32_adapters(kernels, x_dtype, out_dtype):
    """PEFT's default (fp32 adapters over a half model); the 8-bit layer's output promoted to fp32."""
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=x_dtype)
    _compare(x, _adapter_tensors(64, 77, 12, F32), out_dtype=out_dtype, dropout_p=0.1)


def test_under_autocast(kernels):
    x = torch.randn(37, 45, device=DEVICE, dtype=F32)
    _compare(x, _adapter_tensors(45, 29, 12, F32), autocast=BF16)


def test_non_contiguous_input(kernels):
    x = torch.randn(48, 30, device=DEVICE, dtype=F32).T
    assert not x.is_contiguous()
    _compare(x, _adapter_tensors(48, 20, 12, F32), dropout_p=0.1)


def test_all_triplets_masked_leave_the_base_output(kernels):
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=F32)
    tensors = _adapter_tensors(64, 77, 12, F32, all_masked=True)
    _compare(x, tensors)
    W, A, E, B, mask, ranknum = tensors
    base = torch.tanh(x @ W.T)
    y = dispatch.svd_adapter_add(base, x, SVDAdapter(A, E, B, mask, ALPHA, ranknum))
    torch.testing.assert_close(y, base, rtol=0, atol=0)


def test_a_base_output_that_does_not_fit_is_an_error(kernels):
    x = torch.randn(4, 45, device=DEVICE)
    W, A, E, B, mask, ranknum = _adapter_tensors(45, 29, 12, F32)
    with pytest.raises(ValueError, match="does not match the adapter"):
        dispatch.svd_adapter_add(torch.zeros(4, 30, device=DEVICE), x, SVDAdapter(A, E, B, mask, ALPHA, ranknum))
    launch = dispatch.svd_adapter_add(torch.zeros(4, 29, device=DEVICE), x, SVDAdapter(A, E, B, mask, ALPHA, ranknum))
    assert launch.shape == (4, 29)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_torch_compile_fullgraph(kernels, dropout_p):
    """Under torch.compile the op is its torch.library ops (no graph break), with the eager op's results."""
    x = torch.randn(2, 7, 45, device=DEVICE)
    W, A, E, B, mask, ranknum = _adapter_tensors(45, 29, 12, F32)
    adapter = SVDAdapter(A, E, B, mask, ALPHA, ranknum, dropout_p=dropout_p)

    def layer(x):
        return dispatch.svd_adapter_add(torch.tanh(x @ W.T), x, adapter, F32)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    results = []
    for fn in (compiled, layer):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)  # the same dropout seed is drawn inside the op
        y = fn(xi)
        y.square().sum().backward()
        results.append([y.detach(), xi.grad] + [t.grad.clone() for t in (A, E, B)])
        for t in (A, E, B):
            t.grad = None
    for name, got, eager in zip(("y", "dx", "dA", "dE", "dB"), *results):
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6, msg=name)


def test_paper_order_emission_matches_the_reference(kernels, monkeypatch):
    """The backward's importance epilogue over any base: the EMAs and triplet scores the reference's gradient
    hooks compute from the same gradients."""
    from adalora_fast.importance import ImportanceState

    x = torch.randn(2, 9, 64, device=DEVICE)
    W, A, E, B, mask, ranknum = _adapter_tensors(64, 77, 12, F32)
    adapter = SVDAdapter(A, E, B, mask, ALPHA, ranknum)
    emitted = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
        ipt = {n: torch.full_like(p, 0.1) for n, p in zip(("lora_A", "lora_E", "lora_B"), (A, E, B))}
        state = ImportanceState(A, E, B, ipt, {n: t.clone() for n, t in ipt.items()}, beta1=0.85, beta2=0.85)
        dispatch.svd_adapter_add(torch.tanh(x @ W.T), x, adapter, importance=state).square().sum().backward()
        emitted.append((state.emissions, state.triplet_score.clone(), state.exp_avg_ipt, state.exp_avg_unc))
        state.remove()
        for t in (A, E, B):
            t.grad = None
    (n_k, score_k, ipt_k, unc_k), (n_r, score_r, ipt_r, unc_r) = emitted
    assert n_k == n_r == 1
    assert score_k.abs().min() > 1e-4  # (relative comparisons below: the scores are small)
    close = dict(rtol=1e-3, atol=1e-7)  # fp32 products in both (exact fp32 dots in the kernels)
    torch.testing.assert_close(score_k, score_r, **close, msg="triplet score")
    for name in ipt_k:
        torch.testing.assert_close(ipt_k[name], ipt_r[name], **close, msg=f"Ī {name}")
        torch.testing.assert_close(unc_k[name], unc_r[name], **close, msg=f"Ū {name}")
