"""The fused Triton adapter kernels against the PyTorch reference: outputs, every gradient, gradcheck.

On a CPU the kernels run in Triton's interpreter (fp32, fp16, fp64); bf16 runs on a GPU only (the
interpreter's bf16 tl.dot is wrong). The ahead-of-time compile test builds every kernel at every tile
config for sm_90 and sm_80 on any machine.
"""

import os
import subprocess
import sys
import json

import pytest
import torch
from helpers import saved_activation_bytes
from helpers import triton_svd_linear as svd_linear_triton
from tooling.device import BF16, DEVICE, F32, KERNEL_DTYPES, ON_GPU, TOL, assert_close_to_scale

from adalora_fast import FastSVDLinear, dispatch
from adalora_fast.adapter import SVDAdapter
from adalora_fast.kernels.svd_adapter_op import (
    SVDLinearFunction,
    svd_adapter_dropout_mask,
    svd_linear_backward_op,
    svd_linear_forward_op,
)
from adalora_fast.reference import svd_linear_reference

CUDA = ON_GPU
DTYPES = list(KERNEL_DTYPES)
MIXED = [setup for setup in TOL if setup[0] != setup[1] or setup[2] is not None]
ALPHA = 8.0

# (x shape, in, out, r): N = 1, rank 1/4/12/16/64, dims not multiples of 16, 3-D input, a 4095-wide input.
CASES = [
    ((1, 45), 45, 29, 12),
    ((37, 45), 45, 29, 1),
    ((2, 9, 64), 64, 77, 4),
    ((33, 130), 130, 16, 16),
    ((20, 40), 40, 50, 64),
    ((3, 4095), 4095, 24, 12),
]


def _layer_tensors(in_f, out_f, r, dtype, bias=True, fan_in_fan_out=False, seed=0, param_dtype=None):
    """W, b in ``dtype``; A, E, B (requiring grad), the mask and ranknum in ``param_dtype`` (default: the same)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    if fan_in_fan_out:
        W = W.T.contiguous()
    b = torch.randn(out_f, generator=g) if bias else None
    A = torch.randn(r, in_f, generator=g) / in_f**0.5
    E = torch.randn(r, 1, generator=g)
    B = torch.randn(out_f, r, generator=g) / r**0.5
    mask = (torch.rand(r, generator=g) > 0.25).float()
    ranknum = torch.tensor([float(r)])
    to, pto = dict(device=DEVICE, dtype=dtype), dict(device=DEVICE, dtype=param_dtype or dtype)
    W, b = W.to(**to), (b.to(**to) if b is not None else None)
    A, E, B, mask, ranknum = (t.to(**pto) for t in (A, E, B, mask, ranknum))
    return W, b, A.requires_grad_(), E.requires_grad_(), B.requires_grad_(), mask, ranknum


def _run(fn, x, params, g):
    y = fn(x, *params)
    y.backward(g)
    grads = [t.grad.detach().clone() if t.grad is not None else None for t in (x, params[2], params[3], params[4])]
    for t in (x, params[2], params[3], params[4]):
        t.grad = None
    return y.detach(), grads


def _compare(x, params, dtype, dropout_p=0.0, fan_in_fan_out=False, seed=1234, autocast=None):
    """The kernel path against the reference on the same dropout mask: outputs, dtypes, every gradient, within
    the setup's tolerances (``TOL``). ``autocast``: run both under ``torch.autocast`` of that dtype."""
    W, b, A, E, B, mask, ranknum = params
    out_tol, grad_tol = TOL[(dtype, A.dtype, autocast)]
    amp = torch.autocast(x.device.type, dtype=autocast) if autocast else torch.autocast(x.device.type, enabled=False)
    keep = svd_adapter_dropout_mask(seed, x.numel() // x.shape[-1], x.shape[-1], dropout_p, x.device).view(x.shape)

    def fast(x, W, b, A, E, B, mask, ranknum):
        return svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum, fan_in_fan_out=fan_in_fan_out,
                                 dropout_p=dropout_p, training=True, seed=seed)  # fmt: skip

    def ref(x, W, b, A, E, B, mask, ranknum):
        return svd_linear_reference(x, W, b, A, E, B, mask, ALPHA, ranknum, fan_in_fan_out=fan_in_fan_out,
                                    dropout_p=dropout_p, dropout_keep=keep)  # fmt: skip

    out_dtype = autocast or dtype
    g = torch.randn(*x.shape[:-1], B.shape[0], device=x.device, dtype=out_dtype)
    with amp:
        y, grads = _run(fast, x, params, g)
        y_ref, grads_ref = _run(ref, x, params, g)
    assert y.dtype == y_ref.dtype == out_dtype and y.shape == y_ref.shape
    assert_close_to_scale(y, y_ref, out_tol, "y")
    for name, a, r in zip(("dx", "dA", "dE", "dB"), grads, grads_ref):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_close_to_scale(a, r, out_tol if name == "dx" else grad_tol, name)
    assert grads[0].dtype == x.dtype and all(g.dtype == A.dtype for g in grads[1:])


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,in_f,out_f,r", CASES)
def test_matches_reference(kernels, x_shape, in_f, out_f, r, dtype, dropout_p):
    params = _layer_tensors(in_f, out_f, r, dtype)
    x = torch.randn(x_shape, device=DEVICE, dtype=dtype, requires_grad=True)
    _compare(x, params, dtype, dropout_p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_without_bias_fan_in_fan_out(kernels, dtype):
    params = _layer_tensors(48, 20, 12, dtype, bias=False, fan_in_fan_out=True)
    x = torch.randn(48, 30, device=DEVICE, dtype=dtype).T.detach().requires_grad_()
    assert not x.is_contiguous()
    _compare(x, params, dtype, 0.1, fan_in_fan_out=True)


# (x shape, in, out, r): ranks 1, 12 and 64, dims not multiples of 16, a 3-D input.
MIXED_CASES = [((37, 45), 45, 29, 1), ((2, 9, 64), 64, 77, 12), ((20, 40), 40, 50, 64)]


@pytest.mark.parametrize("pair", MIXED, ids=lambda p: "x{}-params{}{}".format(
    str(p[0])[6:], str(p[1])[6:], f"-autocast{str(p[2])[6:]}" if p[2] else ""))  # fmt: skip
@pytest.mark.parametrize("x_shape,in_f,out_f,r", MIXED_CASES)
def test_mixed_dtypes_match_the_reference_in_the_same_setup(kernels, x_shape, in_f, out_f, r, pair):
    """PEFT's default (fp32 adapters over a half model), half adapters over fp32, and autocast over fp32.

    bf16 activations run here too: over fp32 parameters the products are fp32, which the interpreter
    computes right (its bf16 tl.dot is what is wrong)."""
    x_dtype, param_dtype, autocast = pair
    params = _layer_tensors(in_f, out_f, r, x_dtype, param_dtype=param_dtype)
    x = torch.randn(x_shape, device=DEVICE, dtype=x_dtype, requires_grad=True)
    _compare(x, params, x_dtype, dropout_p=0.1 if r == 12 else 0.0, autocast=autocast)


@pytest.mark.parametrize("autocast", [None, BF16])
def test_mixed_non_contiguous_input_and_all_triplets_masked(kernels, autocast):
    x_dtype = F32 if autocast else BF16
    W, b, A, E, B, mask, ranknum = _layer_tensors(48, 20, 12, x_dtype, bias=False, fan_in_fan_out=True, param_dtype=F32)
    x = torch.randn(48, 30, device=DEVICE, dtype=x_dtype).T.detach().requires_grad_()
    assert not x.is_contiguous()
    _compare(x, (W, b, A, E, B, mask, ranknum), x_dtype, 0.1, fan_in_fan_out=True, autocast=autocast)
    with torch.autocast(DEVICE, dtype=autocast or BF16, enabled=autocast is not None):
        y = svd_linear_triton(x, W, b, A, E, B, torch.zeros_like(mask), ALPHA, ranknum, fan_in_fan_out=True)
    assert y.dtype == BF16
    torch.testing.assert_close(y, torch.nn.functional.linear(x.to(BF16), W.T.to(BF16)), rtol=1e-2, atol=1e-2)


def test_autocast_casts_x_once_and_saves_only_that_copy_and_the_rank_tile(kernels):
    """Under autocast the layer saves what F.linear there saves (x and the weight in autocast's dtype) plus
    N × r_pad fp32: no fp32 copy of x, no dropped copy."""
    W, b, A, E, B, mask, ranknum = params = _layer_tensors(64, 48, 12, F32)
    x = torch.randn(40, 64, device=DEVICE, requires_grad=True)

    def fast():
        with torch.autocast(DEVICE, dtype=BF16):
            return svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum, dropout_p=0.1, training=True)

    assert saved_activation_bytes(fast, params) <= x.numel() * 2 + W.numel() * 2 + 40 * 16 * 4


def test_all_triplets_masked_is_the_frozen_layer(kernels):
    W, b, A, E, B, mask, ranknum = _layer_tensors(40, 24, 12, torch.float32)
    mask = torch.zeros_like(mask)
    x = torch.randn(9, 40, device=DEVICE, requires_grad=True)
    y = svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in (A, E, B))
    torch.testing.assert_close(x.grad, W.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    params = _layer_tensors(40, 24, 4, torch.float32)
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    y = svd_linear_triton(x, *params[:6], ALPHA, params[6])
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 40) and torch.count_nonzero(params[3].grad) == 0


# Dropout 0: every Jacobian entry (full mode). Dropout 0.2, the same kernels with the mask applied: random
# projections of the Jacobian (fast mode), a fraction of the interpreter's evaluations.
@pytest.mark.parametrize("dropout_p,fast_mode", [(0.0, False), (0.2, True)])
def test_gradcheck_float64_through_the_kernels(kernels, dropout_p, fast_mode):
    W, b, A, E, B, mask, ranknum = _layer_tensors(21, 13, 5, torch.float64)
    x = torch.randn(6, 21, device=DEVICE, dtype=torch.float64, requires_grad=True)
    def f(x, A, E, B, b):
        adapter = SVDAdapter(A, E, B, mask, ALPHA, ranknum, False, dropout_p)
        return SVDLinearFunction.apply(x, W, b, A, E, B, adapter, 77, None)

    b = b.requires_grad_()
    assert torch.autograd.gradcheck(f, (x, A, E, B, b), eps=1e-6, atol=1e-5, fast_mode=fast_mode)


def test_two_runs_are_bitwise_identical(kernels):
    params = _layer_tensors(70, 33, 12, torch.float16)
    x = torch.randn(50, 70, device=DEVICE, dtype=torch.float16, requires_grad=True)
    g = torch.randn(50, 33, device=DEVICE, dtype=torch.float16)

    def fast(x, W, b, A, E, B, mask, ranknum):
        return svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum, dropout_p=0.1, training=True, seed=5)

    y1, g1 = _run(fast, x, params, g)
    y2, g2 = _run(fast, x, params, g)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_layer_launches_two_kernels_forward_and_three_backward(kernels):
    """Launches, not FLOPs, bound small layers: the forward is shrink + expand, the backward grad_h, grad_a_x
    (dA partials and the adapter's dx) and one reduction for dB, dA and dE; the same on the first call (which
    binds the plan's launches) and on the next ones (which replay them)."""
    from adalora_fast.kernels import svd_adapter_op as sa
    from adalora_fast.kernels.launch import CachedLauncher

    launchers = {name: obj for name, obj in vars(sa).items() if isinstance(obj, CachedLauncher)}

    def launches():
        return {name: sum(launcher.counts().values()) for name, launcher in launchers.items()}

    def launched_by(fn):
        before = launches()
        fn()
        return {name: n - before[name] for name, n in launches().items() if n != before[name]}

    W, b, A, E, B, mask, ranknum = _layer_tensors(70, 33, 12, torch.float32)
    x = torch.randn(50, 70, device=DEVICE, requires_grad=True)
    for _ in range(2):
        out = []
        assert launched_by(lambda: out.append(svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum,
                                                                dropout_p=0.1, training=True))) == {
            "launch_shrink": 1, "launch_expand": 1}  # fmt: skip
        assert launched_by(lambda: out[0].sum().backward()) == {
            "launch_grad_h": 1, "launch_grad_a_x": 1, "launch_grad_reduce": 1}  # fmt: skip


def test_plans_are_per_operand_layout_and_an_unaligned_operand_gets_one_of_its_own(kernels):
    """Calls on operands laid out alike share one plan (cached); another layout of x (strides) or shape gets
    another; an operand off 16-byte alignment gets a plan for that call alone (its launches specialise on the
    alignment), and every call still matches the reference."""
    from adalora_fast.kernels import svd_adapter_op as sa

    params = _layer_tensors(40, 24, 12, F32)
    W, b, A, E, B, mask, ranknum = params
    adapter = SVDAdapter(A, E, B, mask, ALPHA, ranknum)
    seed = sa.dropout_seed(0.0, torch.device(DEVICE))
    x = torch.randn(30, 40, device=DEVICE)
    x_other = torch.randn(30, 40, device=DEVICE)
    x_t = torch.randn(40, 30, device=DEVICE).T  # the same shape, another layout
    x_rows = torch.randn(31, 40, device=DEVICE)
    x_unaligned = torch.randn(30 * 40 + 1, device=DEVICE)[1:].view(30, 40)  # 4 bytes past an aligned start
    plan = sa.adapter_plan(x, adapter, seed)
    assert plan.cached and sa.adapter_plan(x_other, adapter, seed) is plan
    assert sa.adapter_plan(x_t, adapter, seed) is not plan and sa.adapter_plan(x_rows, adapter, seed) is not plan
    unaligned = sa.adapter_plan(x_unaligned, adapter, seed)
    assert not unaligned.cached and sa.adapter_plan(x_unaligned, adapter, seed) is not unaligned
    for xi in (x, x_other, x_t, x_unaligned, x):  # the last call replays the first's bound launches
        _compare(xi.detach().clone().requires_grad_() if xi is not x_unaligned else
                 xi.detach().requires_grad_(), params, F32)  # fmt: skip
    from adalora_fast.kernels import launch

    launch.clear_all()  # (after a change of Triton's knobs): the plans' bound launches go too
    assert sa.adapter_plan(x, adapter, seed) is not plan


def test_the_backward_takes_x_as_a_saved_tensor_hook_hands_it_back(kernels):
    """A saved-tensor hook may return a copy laid out anew (here: column-major): the backward keys its launches
    on x's layout as unpacked, and passes that layout's strides."""
    params = _layer_tensors(40, 24, 12, F32)
    W, b, A, E, B, mask, ranknum = params
    x = torch.randn(30, 40, device=DEVICE, requires_grad=True)
    g = torch.randn(30, 24, device=DEVICE)

    def fast(x, W, b, A, E, B, mask, ranknum):
        return svd_linear_triton(x, W, b, A, E, B, mask, ALPHA, ranknum, dropout_p=0.1, training=True, seed=7)

    _, expected = _run(fast, x, params, g)

    def column_major(t):
        return t.t().contiguous().t() if t.dim() == 2 else t

    with torch.autograd.graph.saved_tensors_hooks(column_major, lambda t: t):
        _, grads = _run(fast, x, params, g)
    for name, a, r in zip(("dx", "dA", "dE", "dB"), grads, expected):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_mask_keeps_1_minus_p_with_no_pattern_across_the_four_draws_of_one_philox_call():
    """Each Philox call gives the columns 4c..4c+3 of a row: they must be as independent as any two."""
    n, k, p = 512, 257, 0.3  # k not a multiple of 4: the last group of a row is partial
    keep = svd_adapter_dropout_mask(11, n, k, p, DEVICE).cpu()
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    groups = keep[:, :256].reshape(n, 64, 4).float()
    all_equal = ((groups == groups[..., :1]).all(-1)).float().mean().item()
    assert abs(all_equal - ((1 - p) ** 4 + p**4)) < 0.02  # as for four independent draws
    for j in range(1, 4):  # neighbours inside a group, and across groups, are uncorrelated
        corr = torch.corrcoef(torch.stack([groups[..., 0].flatten(), groups[..., j].flatten()]))[0, 1].item()
        assert abs(corr) < 0.03, j
    assert not torch.equal(keep[0], keep[1])  # rows draw different masks
    assert not torch.equal(keep, svd_adapter_dropout_mask(12, n, k, p, DEVICE).cpu())  # and seeds
    assert torch.equal(keep, svd_adapter_dropout_mask(11, n, k, p, DEVICE).cpu())


def test_backward_uses_the_forward_dropout_mask(kernels):
    # With Q = I the adapter's output row is x⊙keep/(1−p) restricted to r columns: the mask is visible.
    W, b, A, E, B, mask, ranknum = _layer_tensors(16, 16, 16, torch.float32)
    with torch.no_grad():
        A.copy_(torch.eye(16))
        B.copy_(torch.eye(16))
        E.fill_(1.0)
    mask = torch.ones_like(mask)
    x = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    y = svd_linear_triton(x, W * 0, None, A, E, B, mask, 16.0, torch.tensor([16.0], device=DEVICE),
                          dropout_p=0.5, training=True, seed=3)  # fmt: skip
    keep = svd_adapter_dropout_mask(3, 8, 16, 0.5, DEVICE)
    s = 16.0 / (16 + 1e-5)
    torch.testing.assert_close(y, x.detach() * keep * 2 * s)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() * 2 * s)


def test_layer_dispatches_to_the_kernels_when_forced(kernels, monkeypatch):
    layer = FastSVDLinear(32, 20, r=6, lora_alpha=8).to(DEVICE)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(5, 32, device=DEVICE)
    assert dispatch.adapter_backend(x, layer.weight, layer.lora_A) == "triton"
    y_fast = layer(x)
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    torch.testing.assert_close(y_fast, layer(x), rtol=1e-4, atol=1e-4)


def test_cpu_tensors_use_the_reference_unless_forced():  # on every machine: a GPU's kernels take CUDA tensors
    x = torch.randn(3, 8)
    assert dispatch.adapter_backend(x, x) == "reference"


def test_every_kernel_compiles_for_sm90_and_sm80_with_tensor_cores():
    """The full matrix when a kernel changed since it last passed, else the representative one (tooling.compile_matrix)."""
    from tooling import compile_check, compile_matrix

    choice = compile_matrix.choose("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "tooling.compile_check", "--json"] + ([] if choice.full else ["--representative"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                         cwd=os.path.dirname(os.path.abspath(__file__)))  # fmt: skip
    assert out.returncode == 0, f"{choice.why}: {out.stderr[-3000:]}"
    results = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in results}
    assert kernels == {"shrink", "expand", "grad_h", "reduce", "grad_a_x"}
    assert {r["target"] for r in results} == {80, 90}
    # every dtype setup the kernels take: half, half activations over fp32 adapters (PEFT's default), fp32
    assert {(r["target"], r["dtype"]) for r in results} >= {(90, "bf16"), (90, "bf16/fp32"), (80, "fp16"),
                                                          (80, "fp16/fp32"), (90, "fp32")}  # fmt: skip
    groups = {}  # (kernel, target, dtype, r_pad) -> the configs built
    for r in results:
        groups.setdefault((r["kernel"], r["target"], r["dtype"], r["r_pad"]), set()).add(r["config"])
    assert set(groups) == set(compile_check.matrix_groups(representative=not choice.full))
    if choice.full:  # every group built every config of its kernel
        for (kernel, *_), configs in groups.items():
            assert configs == {r["config"] for r in results if r["kernel"] == kernel}, kernel
    for r in results:
        assert r["shared_ok"], r
        if r["kernel"] != "reduce" and r["dtype"] != "fp32":  # half inputs, or TF32 over fp32 adapters
            assert r["tensor_cores"], r
    # Registers: for every kernel, target, dtype and rank pad the autotuner has a config that does not spill.
    if compile_check._cuobjdump() is not None:  # Triton ships it; read from each cubin
        assert all(r["stack_bytes"] is not None for r in results)
        assert compile_check.spilling_in_every_config([compile_check.CompileResult(**r) for r in results]) == []
    choice.record_pass()


def test_saved_activations_are_x_plus_one_fp32_rank_tile(kernels):
    W, b, A, E, B, mask, ranknum = params = _layer_tensors(64, 48, 12, torch.float32)
    x = torch.randn(40, 64, device=DEVICE, requires_grad=True)

    def fast(x, p):
        return svd_linear_triton(x, *p[:6], ALPHA, p[6], dropout_p=0.1, training=True)

    def peft_like(x, p):
        return svd_linear_reference(x, *p[:6], ALPHA, p[6], dropout_p=0.1, training=True)

    budget = x.numel() * x.element_size() + 40 * 16 * 4  # x itself + an N × r_pad fp32 tile
    assert saved_activation_bytes(lambda: fast(x, params), params) <= budget
    assert saved_activation_bytes(lambda: peft_like(x, params), params) > budget  # the reference keeps a dropped copy of x


def test_layers_without_a_mask_train_after_an_inference_mode_call(kernels):
    """The shared mask of ones is made outside inference mode: a later training backward can save it."""
    import adalora_fast.kernels.svd_adapter_op as sa

    sa._ONES.clear()
    W, b, A, E, B, _, ranknum = _layer_tensors(20, 10, 4, torch.float32)
    x = torch.randn(3, 20, device=DEVICE)
    with torch.inference_mode():
        y_inf = svd_linear_triton(x, W, b, A, E, B, None, ALPHA, ranknum)
    A.requires_grad_()
    y = svd_linear_triton(x, W, b, A, E, B, None, ALPHA, ranknum, training=True)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf) and A.grad is not None and A.grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_custom_ops_and_the_eager_launchers_are_bitwise_the_same(kernels, dropout):
    """SVDLinearFunction is the one autograd path: eagerly it calls the launchers, under torch.compile the
    torch.library ops around them. Both give the same bits."""
    W, b, A, E, B, mask, ranknum = _layer_tensors(40, 24, 12, torch.float32)
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 9, 24, device=DEVICE)
    x2d, dy2d = x.detach().reshape(-1, 40), dy.reshape(-1, 24)
    with torch.no_grad():
        y_op, h, seed = svd_linear_forward_op(x2d, W, b, A, E, B, mask, ALPHA, ranknum, False, dropout, 123)
        g_op = svd_linear_backward_op(dy2d, x2d, W, A, E, B, mask, ALPHA, ranknum, False, dropout, h, seed, True)
    y_fn = SVDLinearFunction.apply(x, W, b, A, E, B, SVDAdapter(A, E, B, mask, ALPHA, ranknum, False, dropout), 123,
                                   None)  # fmt: skip
    g_fn = torch.autograd.grad(y_fn, [x, A, E, B], dy)
    assert torch.equal(y_op.view_as(y_fn), y_fn)
    assert torch.equal(g_op[0].view_as(x), g_fn[0]) and all(torch.equal(a, b) for a, b in zip(g_op[1:], g_fn[1:]))


@pytest.mark.parametrize("dropout,autocast", [(0.0, None), (0.1, None), (0.1, BF16)])
def test_torch_compile_fullgraph_on_the_kernel_path(kernels, monkeypatch, dropout, autocast):
    """The Triton path is a torch.library op with a fake implementation: no graph break, eager results;
    under autocast too (the casts F.linear would get are traced before the op)."""
    dispatch.reset_backend_calls()
    torch.manual_seed(0)
    model = torch.nn.Sequential(FastSVDLinear(24, 20, r=6, lora_alpha=6, lora_dropout=dropout), torch.nn.GELU(),
                                FastSVDLinear(20, 12, r=6, lora_alpha=6)).to(DEVICE)  # fmt: skip
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_E.normal_()
    x = torch.randn(2, 7, 24, device=DEVICE)
    # inductor on a GPU; on a CPU the interpreter runs the kernels and aot_eager keeps the trace cheap
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    amp = torch.autocast(DEVICE, dtype=autocast or BF16, enabled=autocast is not None)
    torch.manual_seed(11)
    with amp:
        y = compiled(x)
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout seed is drawn inside the op
    with amp:
        y_eager = model(x)
    y_eager.float().square().sum().backward()
    assert y.dtype == (autocast or torch.float32)
    assert dispatch.backend_calls()["svd_adapter"].get("reference", 0) == 0
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
