"""The SVD-adapted linear layer on the fused kernels: one autograd path, eager and under ``torch.compile``.

``svd_linear_triton`` is the kernel path's entry point (the dispatcher calls it). ``SVDLinearFunction`` is
the one autograd path: eagerly its forward and backward call the launchers directly (the lowest per-call
overhead: it matters with ~150 adapted layers per step); under ``torch.compile`` the same forward and
backward call them through two ``torch.library`` custom ops with fake implementations, so that
``torch.compile(fullgraph=True)`` traces a layer without a graph break.
"""

from __future__ import annotations

import torch

from ..adapter import SVDAdapter
from .svd_adapter_launch import adapter_plan, dropout_seed, svd_adapter_backward, svd_adapter_forward, unit_mask
from .utils import accumulate_dtype, rank_pad


class SVDLinearFunction(torch.autograd.Function):
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` with the frozen GEMMs on cuBLAS and the adapter on the kernels.

    ``apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, importance)``: the trainable tensors are
    arguments of their own (autograd differentiates arguments); ``adapter`` holds them too, with the
    rest of the adapter (its triplet mask must be a tensor). ``seed``: an int, or None to draw one on the
    device. ``importance``: an ImportanceEmission this backward emits into (eager only).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, adapter: SVDAdapter, seed: int | None, importance):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a reshape costs a view even when a no-op)
        if torch.compiler.is_compiling():
            _, _, _, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
            y, h, seed_t = svd_linear_forward_op(x2d, weight, bias, lora_A, lora_E, lora_B, mask, ranknum, scaling,
                                                 fan_in_fan_out, dropout_p, -1 if seed is None else seed)  # fmt: skip
            plan = None
        else:
            seed_t = dropout_seed(adapter.dropout_p, x.device, seed)
            plan = adapter_plan(x2d, adapter, seed_t)
            y, h = svd_adapter_forward(x2d, weight, bias, adapter, seed_t, plan=plan)
        # Saved with autograd's checks: the activation, the layer's weights and H (saved-tensor hooks see them,
        # and an in-place change before the backward is an error). The adapter's mask and ranknum and the seed
        # tensor are buffers nothing changes inside a step: kept as they are (each saved tensor costs a pack
        # and an unpack).
        ctx.save_for_backward(x2d, weight, lora_A, lora_E, lora_B, h)
        # The backward launches on the forward's plan: the adapter's tensors as they were laid out here (a
        # parameter whose .data is swapped between the forward and its backward is not supported).
        ctx.adapter, ctx.seed, ctx.plan, ctx.importance = adapter, seed_t, plan, importance
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_E, lora_B, h = ctx.saved_tensors  # (unpacking checks for in-place changes)
        adapter = ctx.adapter
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        needs_dx, needs_w, needs_b = ctx.needs_input_grad[:3]
        if torch.compiler.is_compiling():
            _, _, _, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
            dx, d_a, d_e, d_b = svd_linear_backward_op(dy2d, x2d, weight, lora_A, lora_E, lora_B, mask, ranknum, h,
                                                       ctx.seed, scaling, fan_in_fan_out, dropout_p, needs_dx)  # fmt: skip
        else:
            dx, d_a, d_e, d_b = svd_adapter_backward(dy2d, x2d, weight, adapter, h, ctx.seed, needs_dx, ctx.importance,
                                                     plan=ctx.plan)  # fmt: skip
        d_w = d_bias = None
        if needs_w or needs_b:
            d_w, d_bias = _base_param_grads(dy2d, x2d, needs_w, ctx.has_bias and needs_b, adapter.fan_in_fan_out)
        if needs_dx and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return (dx if needs_dx else None), d_w, d_bias, d_a, d_e, d_b, None, None, None


# autograd.Function.apply without its Python wrapper, for eager calls outside functorch's transforms: there the
# wrapper's only work is unwrapping functorch's dead wrappers, done here for x (the layer's weights and adapter
# are its own parameters, not tensors that outlived a transform); the wrapper costs about as much as the C++
# apply itself.
try:
    _apply_eagerly = torch._C._FunctionBase.__dict__["apply"].__get__(None, SVDLinearFunction)
    from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead
except (AttributeError, KeyError, ImportError):  # pragma: no cover - another torch: the public path
    _apply_eagerly = _unwrap_if_dead = None


def _base_param_grads(dy2d, x2d, needs_weight: bool, needs_bias: bool, fan_in_fan_out: bool):
    """Gradients of a trainable base weight / bias (unusual for AdaLoRA, but supported)."""
    d_w = None
    if needs_weight:
        d_w = dy2d.t().mm(x2d)
        d_w = d_w.t() if fan_in_fan_out else d_w
    return d_w, (dy2d.sum(dim=0) if needs_bias else None)


# ---------------------------------------------------------------------------------------------
# torch.library ops: the launchers as opaque ops with fake implementations, for torch.compile. A custom op's
# schema takes tensors and scalars, so the adapter is spelled out field by field here.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("adalora_fast::svd_linear_forward", mutates_args=())
def svd_linear_forward_op(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, ranknum: torch.Tensor, scaling: float, fan_in_fan_out: bool,
    dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, H, the dropout seed tensor the backward reuses) for a 2-D x. ``seed < 0`` draws one on the device."""
    seed_t = (dropout_seed(dropout_p, x2d.device, None if seed < 0 else seed) if dropout_p > 0
              else torch.empty(1, dtype=torch.int64, device=x2d.device))  # an op's output is its own tensor
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p)
    y, h = svd_adapter_forward(x2d, weight, bias, adapter, seed_t)
    return y, h, seed_t


@svd_linear_forward_op.register_fake
def _(x2d, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p, seed):
    y = x2d.new_empty((x2d.shape[0], lora_B.shape[0]))
    h = x2d.new_empty((x2d.shape[0], rank_pad(lora_A.shape[0])), dtype=accumulate_dtype(lora_A.dtype))
    return y, h, x2d.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("adalora_fast::svd_linear_backward", mutates_args=())
def svd_linear_backward_op(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, ranknum: torch.Tensor, h: torch.Tensor, seed: torch.Tensor,
    scaling: float, fan_in_fan_out: bool, dropout_p: float, needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dA, dE, dB); dx is empty when not needed (a custom op returns tensors only)."""
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p)
    dx, d_a, d_e, d_b = svd_adapter_backward(dy2d, x2d, weight, adapter, h, seed, needs_dx)
    return (dx if dx is not None else x2d.new_empty(0)), d_a, d_e, d_b


@svd_linear_backward_op.register_fake
def _(dy2d, x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h, seed, scaling, fan_in_fan_out, dropout_p,
      needs_dx):  # fmt: skip
    dx = torch.empty_like(x2d) if needs_dx else x2d.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)


# ---------------------------------------------------------------------------------------------
# The kernel path's entry point
# ---------------------------------------------------------------------------------------------


def svd_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter, *,
                      seed: int | None = None, importance=None) -> torch.Tensor:  # fmt: skip
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` on the fused kernels (the dispatcher's Triton entry point).

    The dropout mask (``adapter.dropout_p``) is drawn from ``seed``; by default the seed is drawn on the
    input's device (:func:`dropout_seed`: reproducible under ``torch.manual_seed``, no host sync, CUDA-graph
    safe). ``importance``: an ImportanceEmission this call's backward emits into (paper order).

    Dtypes: x and the base weight share one (fp16, bf16 or fp32); the adapter's parameters may hold
    another (:func:`~adalora_fast.kernels.utils.dot_settings` says how each product is computed). Under
    ``torch.autocast`` x, the weight and the bias are cast to autocast's dtype first, as ``F.linear`` is
    there; the adapter's parameters keep theirs (and so do their gradients).
    """
    if torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type):
        x, weight, bias = _autocast_operands(x, weight, bias)
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    compiling = torch.compiler.is_compiling()
    if adapter.triplet_mask is None:  # (a fresh one while tracing: the cache is a side effect the compiler need not see)
        r = lora_A.shape[0]
        mask = torch.ones(r, device=lora_A.device, dtype=lora_A.dtype) if compiling else unit_mask(
            r, lora_A.device, lora_A.dtype
        )
        adapter = adapter._replace(triplet_mask=mask)
    if compiling:
        if importance is not None:
            return _eager_emitting_importance(x, weight, bias, adapter, seed, importance)
        return SVDLinearFunction.apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, None)
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_E.requires_grad
                                         or lora_B.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):  # fmt: skip
        # Nothing to differentiate (evaluation, no_grad): the launchers alone, without autograd's machinery.
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y, _ = svd_adapter_forward(x2d, weight, bias, adapter, dropout_seed(adapter.dropout_p, x.device, seed))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    if _apply_eagerly is None or torch._C._are_functorch_transforms_active():
        return SVDLinearFunction.apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, importance)
    return _apply_eagerly(_unwrap_if_dead(x), weight, bias, lora_A, lora_E, lora_B, adapter, seed, importance)


@torch.compiler.disable
def _eager_emitting_importance(x, weight, bias, adapter, seed, importance):
    """Paper-order emission runs in the eager launchers (its epilogue updates Python-held state): under
    torch.compile this call is left to eager execution, a graph break."""
    return SVDLinearFunction.apply(x, weight, bias, *adapter.factors, adapter, seed, importance)


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_operands(x, weight, bias):
    """x, weight and bias as autocast hands them to ``F.linear``: fp16/bf16/fp32 tensors in its dtype.
    The cast of x is the one copy saved for the backward (the base GEMM's own, under autocast)."""
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype != dtype and t.dtype in _AUTOCAST_ELIGIBLE else t

    return cast(x), cast(weight), cast(bias)
