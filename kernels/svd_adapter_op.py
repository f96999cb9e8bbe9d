"""The SVD adapter op on the fused kernels (:mod:`.svd_adapter`), from its entry point down to the launches.

Read top to bottom:

* :func:`svd_linear_triton`, the kernel path's entry point (:func:`adalora_fast.dispatch.svd_adapter_linear`
  calls it);
* :class:`SVDLinearFunction`, the one autograd path: eagerly its forward and backward call the launchers
  directly (the lowest per-call overhead: it matters with ~150 adapted layers per step); under
  ``torch.compile`` the same forward and backward call them through two ``torch.library`` custom ops with
  fake implementations, so that ``torch.compile(fullgraph=True)`` traces a layer without a graph break;
* the launchers :func:`svd_adapter_forward` and :func:`svd_adapter_backward`: the adapter's kernels, adding
  onto what the caller gives them (the frozen layer's y and dx in the fused layer, zeros for the adapter's
  term alone), each kernel through a :class:`~.launch.CachedLauncher`; :func:`forward_launches` hands out a
  forward's launches unlaunched, for measuring their host cost;
* plans: what a call decides from its operands' layout, decided once, with the launches bound to it;
* dropout seeds and the all-ones triplet mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..adapter import SVDAdapter
from ..dtypes import accumulate_dtype
from ..importance import ImportanceEmission
from .launch import (
    BoundLaunch,
    CachedLauncher,
    current_device,
    current_stream,
    direct_launch_enabled,
    launch_hooks_empty,
    make_program,
    on_clear_all,
    program_launch,
    programs_possible,
)
from .precision import dot_settings
from .svd_adapter import (
    GRAD_A_MIN_ROWS_PER_SPLIT,
    GRAD_H_BLOCK_M,
    REDUCE_BLOCK_ROWS,
    _dropout_keep_mask_kernel,
    svd_adapter_expand,
    svd_adapter_grad_a_x,
    svd_adapter_grad_h,
    svd_adapter_grad_reduce,
    svd_adapter_shrink,
)
from .tiles import cdiv, rank_pad

# ---------------------------------------------------------------------------------------------
# The kernel path's entry point
# ---------------------------------------------------------------------------------------------


def svd_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter, *,
                      seed: int | None = None, emission: ImportanceEmission | None = None) -> torch.Tensor:  # fmt: skip
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` on the fused kernels (the dispatcher's Triton entry point).

    The dropout mask (``adapter.dropout_p``) is drawn from ``seed``; by default the seed is drawn on the
    input's device (:func:`dropout_seed`: reproducible under ``torch.manual_seed``, no host sync, CUDA-graph
    safe). ``emission``: an :class:`~adalora_fast.importance.ImportanceEmission` this call's backward emits
    into (paper order).

    Dtypes: x and the base weight share one (fp16, bf16 or fp32); the adapter's parameters may hold
    another (:func:`~adalora_fast.kernels.precision.dot_settings` says how each product is computed). Under
    ``torch.autocast`` x, the weight and the bias are cast to autocast's dtype first, as ``F.linear`` is
    there; the adapter's parameters keep theirs (and so do their gradients).
    """
    if torch.is_autocast_enabled("cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type):
        x, weight, bias = _autocast_operands(x, weight, bias)
    adapter, compiling = _with_triplet_mask(adapter)
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    if compiling:
        apply = SVDLinearFunction.apply if emission is None else _eager_apply(SVDLinearFunction)
        return apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, emission)
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_E.requires_grad
                                         or lora_B.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):  # fmt: skip
        # Nothing to differentiate (evaluation, no_grad): the forward alone, without autograd's machinery.
        if _PROGRAM_PLANS and programs_possible() and launch_hooks_empty():
            y, seed = _program_call(x, weight, bias, adapter, seed, differentiable=False)
            if y is not None:
                return y
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        seed_t = dropout_seed(adapter.dropout_p, x.device, seed)
        plan = adapter_plan(x2d, adapter, seed_t)
        y, h = _fused_forward(x2d, weight, bias, adapter, seed_t, plan)
        if plan.cached and programs_possible():
            _serve_from_programs(plan, x2d, adapter, seed_t, y, h, x.shape)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    if _apply_eagerly is None or torch._C._are_functorch_transforms_active():
        return SVDLinearFunction.apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, emission)
    x = _unwrap_if_dead(x)
    if emission is None and _PROGRAM_PLANS and programs_possible() and launch_hooks_empty():
        y, seed = _program_call(x, weight, bias, adapter, seed)
        if y is not None:
            return y
    return _apply_eagerly(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, emission)


def _with_triplet_mask(adapter: SVDAdapter) -> tuple[SVDAdapter, bool]:
    """(the adapter with a triplet mask, whether torch.compile is tracing). An adapter without one (PEFT's
    layers) gets the cached all-ones mask eagerly, a fresh one while tracing (the cache is a side effect the
    compiler need not see)."""
    compiling = torch.compiler.is_compiling()
    if adapter.triplet_mask is None:
        lora_A = adapter.lora_A
        r = lora_A.shape[0]
        mask = torch.ones(r, device=lora_A.device, dtype=lora_A.dtype) if compiling else unit_mask(
            r, lora_A.device, lora_A.dtype
        )
        # (built field by field: NamedTuple._replace costs three times as much, in every PEFT layer's call)
        adapter = SVDAdapter(lora_A, adapter.lora_E, adapter.lora_B, mask, adapter.scaling, adapter.ranknum,
                             adapter.fan_in_fan_out, adapter.dropout_p)  # fmt: skip
    return adapter, compiling


def _eager_apply(function: type[torch.autograd.Function]):
    """``function.apply`` left to eager execution under torch.compile (a graph break): paper-order emission runs
    in the eager launchers, whose epilogue updates Python-held state."""
    return torch.compiler.disable(function.apply)


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_operands(x, weight, bias):
    """x, weight and bias as autocast hands them to ``F.linear``: fp16/bf16/fp32 tensors in its dtype.
    The cast of x is the one copy saved for the backward (the base GEMM's own, under autocast)."""
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype != dtype and t.dtype in _AUTOCAST_ELIGIBLE else t

    return cast(x), cast(weight), cast(bias)


# ---------------------------------------------------------------------------------------------
# The adapter onto any base layer's output
# ---------------------------------------------------------------------------------------------


def svd_adapter_add_triton(result: torch.Tensor, x: torch.Tensor, adapter: SVDAdapter, out_dtype: torch.dtype, *,
                           seed: int | None = None, emission: ImportanceEmission | None = None) -> torch.Tensor:  # fmt: skip
    """``result + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` as a new tensor of ``out_dtype``, for the output ``result`` of
    any base layer (bitsandbytes, GPTQ, an ``nn.Linear`` subclass, …) on x: the base layer's own autograd gives
    its part of dx, and this op's backward the adapter's part, dA, dE and dB (and the paper-order
    ``emission``) as the fused layer's does.

    x keeps its dtype (the kernels cast its tiles to the adapter's in registers, as PEFT casts x); under
    ``torch.autocast`` nothing is cast here: the base layer has run under it already.
    """
    adapter, compiling = _with_triplet_mask(adapter)
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    if compiling:
        apply = SVDAdapterAddFunction.apply if emission is None else _eager_apply(SVDAdapterAddFunction)
        return apply(result, x, lora_A, lora_E, lora_B, adapter, seed, emission, out_dtype)
    programs = _ADD_PROGRAM_PLANS and programs_possible() and launch_hooks_empty()
    if not (torch.is_grad_enabled() and (result.requires_grad or x.requires_grad or lora_A.requires_grad
                                         or lora_E.requires_grad or lora_B.requires_grad)):  # fmt: skip
        if programs:
            y, seed = _add_program_call(result, x, adapter, out_dtype, seed, differentiable=False)
            if y is not None:
                return y
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        seed_t = dropout_seed(adapter.dropout_p, x.device, seed)
        plan = adapter_plan(x2d, adapter, seed_t)
        y, h = _onto_base(x2d, adapter, seed_t, result, out_dtype, plan)
        if plan.cached and programs_possible():
            _serve_add_from_programs(plan, x2d, adapter, seed_t, y, h, result, x.shape)
        return y.view(result.shape)
    if programs and emission is None and not torch._C._are_functorch_transforms_active():
        y, seed = _add_program_call(result, x, adapter, out_dtype, seed)
        if y is not None:
            return y
    return SVDAdapterAddFunction.apply(result, x, lora_A, lora_E, lora_B, adapter, seed, emission, out_dtype)


def _onto_base(x2d, adapter: SVDAdapter, seed: torch.Tensor, result: torch.Tensor, out_dtype: torch.dtype,
               plan=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y = the base layer's output + the adapter's term, in a fresh (N × out) tensor of ``out_dtype``; H). The
    base output is read by the expand kernel as it is (not modified: its own backward may have saved it)."""
    n = x2d.shape[0]
    y = torch.empty((n, result.shape[-1]), device=result.device, dtype=out_dtype)
    return y, svd_adapter_forward(x2d, adapter, seed, y, plan, base=result.reshape(n, result.shape[-1]))


class SVDAdapterAddFunction(torch.autograd.Function):
    """``result + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` (:func:`svd_adapter_add_triton`).

    ``apply(result, x, lora_A, lora_E, lora_B, adapter, seed, emission, out_dtype)``; eagerly the launchers,
    under ``torch.compile`` the custom ops (the backward's without a base weight)."""

    @staticmethod
    def forward(ctx, result, x, lora_A, lora_E, lora_B, adapter: SVDAdapter, seed, emission, out_dtype):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y, h, seed_t = svd_adapter_add_forward_op(
                result.reshape(x2d.shape[0], -1), x2d, lora_A, lora_E, lora_B, adapter.triplet_mask, adapter.scaling,
                adapter.ranknum, adapter.dropout_p, -1 if seed is None else seed, out_dtype,
            )  # fmt: skip
            plan = None
        else:
            seed_t = dropout_seed(adapter.dropout_p, x.device, seed)
            plan = adapter_plan(x2d, adapter, seed_t)
            y, h = _onto_base(x2d, adapter, seed_t, result, out_dtype, plan)
            if plan.cached and emission is None and programs_possible():
                _serve_add_from_programs(plan, x2d, adapter, seed_t, y, h, result, x.shape)
        ctx.save_for_backward(x2d, lora_A, lora_E, lora_B, h)
        ctx.adapter, ctx.seed, ctx.plan, ctx.emission = adapter, seed_t, plan, emission
        ctx.x_shape, ctx.result_dtype = x.shape, result.dtype
        return y.view(result.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, lora_A, lora_E, lora_B, h = ctx.saved_tensors
        adapter = ctx.adapter
        dy2d = dy.reshape(-1, dy.shape[-1])
        needs_result, needs_dx = ctx.needs_input_grad[:2]
        if torch.compiler.is_compiling():
            dx, d_a, d_e, d_b = svd_linear_backward_op(
                dy2d, x2d, None, lora_A, lora_E, lora_B, adapter.triplet_mask, adapter.scaling, adapter.ranknum,
                False, adapter.dropout_p, h, ctx.seed, needs_dx,
            )  # fmt: skip
        else:
            plan = ctx.plan
            dx, d_a, d_e, d_b = _backward(dy2d, x2d, None, adapter, h, ctx.seed, needs_dx, ctx.emission, plan)
            if ctx.emission is None and plan.programs_forward_add and programs_possible():
                _make_backward_program(plan, dy2d, x2d, adapter, h, ctx.seed, dx, False)
        d_result = dy.to(ctx.result_dtype) if needs_result else None
        return d_result, (dx.view(ctx.x_shape) if needs_dx else None), d_a, d_e, d_b, None, None, None, None


@torch.library.custom_op("adalora_fast::svd_adapter_add_forward", mutates_args=())
def svd_adapter_add_forward_op(
    result2d: torch.Tensor, x2d: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor,
    triplet_mask: torch.Tensor, scaling: float, ranknum: torch.Tensor, dropout_p: float, seed: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(result + the adapter's term, H, the dropout seed tensor) for a 2-D x and base output."""
    seed_t = (dropout_seed(dropout_p, x2d.device, None if seed < 0 else seed) if dropout_p > 0
              else torch.empty(1, dtype=torch.int64, device=x2d.device))  # fmt: skip
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, False, dropout_p)
    return (*_onto_base(x2d, adapter, seed_t, result2d, out_dtype), seed_t)


@svd_adapter_add_forward_op.register_fake
def _(result2d, x2d, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, dropout_p, seed, out_dtype):
    y = result2d.new_empty(result2d.shape, dtype=out_dtype)
    h = x2d.new_empty((x2d.shape[0], rank_pad(lora_A.shape[0])), dtype=accumulate_dtype(lora_A.dtype))
    return y, h, x2d.new_empty((1,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The autograd path
# ---------------------------------------------------------------------------------------------


class SVDLinearFunction(torch.autograd.Function):
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` with the frozen GEMMs on cuBLAS and the adapter on the kernels.

    ``apply(x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, emission)``: the trainable tensors are
    arguments of their own (autograd differentiates arguments); ``adapter`` holds them too, with the
    rest of the adapter (its triplet mask must be a tensor). ``seed``: an int, or None to draw one on the
    device. ``emission``: an ImportanceEmission this backward emits into (eager only).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, adapter: SVDAdapter, seed: int | None, emission):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a reshape costs a view even when a no-op)
        if torch.compiler.is_compiling():
            y, h, seed_t = svd_linear_forward_op(
                x2d, weight, bias, lora_A, lora_E, lora_B, adapter.triplet_mask, adapter.scaling, adapter.ranknum,
                adapter.fan_in_fan_out, adapter.dropout_p, -1 if seed is None else seed,
            )  # fmt: skip
            plan = None
        else:
            seed_t = dropout_seed(adapter.dropout_p, x.device, seed)
            plan = adapter_plan(x2d, adapter, seed_t)
            y, h = _fused_forward(x2d, weight, bias, adapter, seed_t, plan)
            if plan.cached and emission is None and programs_possible():
                _serve_from_programs(plan, x2d, adapter, seed_t, y, h, x.shape)
        # Saved with autograd's checks: the activation, the layer's weights and H (saved-tensor hooks see them,
        # and an in-place change before the backward is an error). The adapter's mask and ranknum and the seed
        # tensor are buffers nothing changes inside a step: kept as they are (each saved tensor costs a pack
        # and an unpack).
        ctx.save_for_backward(x2d, weight, lora_A, lora_E, lora_B, h)
        # The backward launches on the forward's plan: the adapter's tensors as they were laid out here (a
        # parameter whose .data is swapped between the forward and its backward is not supported).
        ctx.adapter, ctx.seed, ctx.plan, ctx.emission = adapter, seed_t, plan, emission
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_E, lora_B, h = ctx.saved_tensors  # (unpacking checks for in-place changes)
        adapter = ctx.adapter
        dy2d = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        needs_dx, needs_w, needs_b = ctx.needs_input_grad[:3]
        if torch.compiler.is_compiling():
            dx, d_a, d_e, d_b = svd_linear_backward_op(
                dy2d, x2d, weight, lora_A, lora_E, lora_B, adapter.triplet_mask, adapter.scaling, adapter.ranknum,
                adapter.fan_in_fan_out, adapter.dropout_p, h, ctx.seed, needs_dx,
            )  # fmt: skip
        else:
            plan = ctx.plan
            dx, d_a, d_e, d_b = _backward(dy2d, x2d, weight, adapter, h, ctx.seed, needs_dx, ctx.emission, plan)
            if ctx.emission is None and plan.program_forward.__class__ is int and programs_possible():
                _make_backward_program(plan, dy2d, x2d, adapter, h, ctx.seed, dx, True)
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


def _fused_forward(x2d, weight, bias, adapter: SVDAdapter, seed: torch.Tensor, plan=None):
    """(y, H) of the fused layer: the frozen layer's GEMM (bias in cuBLAS's epilogue), then the adapter's term
    added onto its output."""
    if adapter.fan_in_fan_out:
        y = x2d.mm(weight) if bias is None else torch.addmm(bias, x2d, weight)
    else:
        y = F.linear(x2d, weight, bias)
    return y, svd_adapter_forward(x2d, adapter, seed, y, plan)


def _backward(dy2d, x2d, weight: torch.Tensor | None, adapter: SVDAdapter, h, seed, needs_dx: bool, emission=None,
              plan=None):  # fmt: skip
    """(dx or None, dA, dE, dB): with a base ``weight``, the adapter's dx added onto the base GEMM's dY·W0;
    without one (a layer over any other base), the adapter's dx alone, written into a fresh tensor (autograd
    adds the base layer's own)."""
    dx = None
    if needs_dx:
        if weight is None:
            dx = torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype)
        else:
            dx = dy2d.mm(weight.t() if adapter.fan_in_fan_out else weight)
    return svd_adapter_backward(dy2d, x2d, adapter, h, seed, dx, emission, plan, accumulate_dx=weight is not None)


def _base_param_grads(dy2d, x2d, needs_weight: bool, needs_bias: bool, fan_in_fan_out: bool):
    """Gradients of a trainable base weight / bias (unusual for AdaLoRA, but supported)."""
    d_w = None
    if needs_weight:
        d_w = dy2d.t().mm(x2d)
        d_w = d_w.t() if fan_in_fan_out else d_w
    return d_w, (dy2d.sum(dim=0) if needs_bias else None)


# ---------------------------------------------------------------------------------------------
# torch.library ops: the launchers as opaque ops with fake implementations, for torch.compile. A custom op's
# schema takes tensors and scalars, so the adapter is spelled out field by field here, in SVDAdapter's order.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("adalora_fast::svd_linear_forward", mutates_args=())
def svd_linear_forward_op(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, scaling: float, ranknum: torch.Tensor, fan_in_fan_out: bool,
    dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, H, the dropout seed tensor the backward reuses) for a 2-D x. ``seed < 0`` draws one on the device."""
    seed_t = (dropout_seed(dropout_p, x2d.device, None if seed < 0 else seed) if dropout_p > 0
              else torch.empty(1, dtype=torch.int64, device=x2d.device))  # an op's output is its own tensor
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, fan_in_fan_out, dropout_p)
    y, h = _fused_forward(x2d, weight, bias, adapter, seed_t)
    return y, h, seed_t


@svd_linear_forward_op.register_fake
def _(x2d, weight, bias, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, fan_in_fan_out, dropout_p, seed):
    y = x2d.new_empty((x2d.shape[0], lora_B.shape[0]))
    h = x2d.new_empty((x2d.shape[0], rank_pad(lora_A.shape[0])), dtype=accumulate_dtype(lora_A.dtype))
    return y, h, x2d.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("adalora_fast::svd_linear_backward", mutates_args=())
def svd_linear_backward_op(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, scaling: float, ranknum: torch.Tensor, fan_in_fan_out: bool,
    dropout_p: float, h: torch.Tensor, seed: torch.Tensor, needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dA, dE, dB); dx is empty when not needed (a custom op returns tensors only). ``weight``: the base
    weight whose dY·W0 dx starts from; None: dx holds the adapter's term alone (starting from zeros)."""
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, fan_in_fan_out, dropout_p)
    dx, d_a, d_e, d_b = _backward(dy2d, x2d, weight, adapter, h, seed, needs_dx)
    return (dx if dx is not None else x2d.new_empty(0)), d_a, d_e, d_b


@svd_linear_backward_op.register_fake
def _(dy2d, x2d, weight, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, fan_in_fan_out, dropout_p, h, seed,
      needs_dx):  # fmt: skip
    dx = torch.empty_like(x2d) if needs_dx else x2d.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Each kernel through a CachedLauncher: Triton's own path (autotuning included) once per specialization, then
# the compiled kernel's launcher directly (on a GPU with a verified Triton; ``kernel[grid](...)`` otherwise).
# Launches are the fixed cost of small layers.
launch_shrink = CachedLauncher(svd_adapter_shrink)
launch_expand = CachedLauncher(svd_adapter_expand)
launch_grad_h = CachedLauncher(svd_adapter_grad_h)
launch_grad_reduce = CachedLauncher(svd_adapter_grad_reduce)
launch_grad_a_x = CachedLauncher(svd_adapter_grad_a_x)


def svd_adapter_forward(x2d: torch.Tensor, adapter: SVDAdapter, seed: torch.Tensor, y: torch.Tensor,
                        plan: SVDAdapterPlan | None = None, base: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Writes ``base`` + the adapter's term s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ into ``y`` (N × out); returns
    H = dropout(x)·Aᵀ (N × R_PAD, in the accumulation dtype), kept for the backward.

    ``base`` (N × out, any layout and float dtype; default ``y`` itself: the term is added in place): the
    frozen layer's x·W0ᵀ + b in the fused layer, a base layer's output over any other base, zeros for the
    adapter's term alone (bandwidth measurements). ``adapter.triplet_mask`` must be a tensor here
    (:func:`unit_mask` for none); ``seed``: the dropout seed tensor (:func:`dropout_seed`). ``plan``:
    :func:`adapter_plan` of these operands, when the caller has it.
    """
    check_seed(seed)
    if plan is None:
        plan = adapter_plan(x2d, adapter, seed)
    # (sizes as arguments: a faster parse than a tuple)
    h = torch.empty(plan.n, plan.r_pad, device=x2d.device, dtype=plan.acc)
    if plan.n == 0:
        return h
    if base is None:
        base = y
    y_strides, base_strides = y.stride(), base.stride()
    shrink_args, expand_args = _forward_args(plan, x2d, adapter, seed, y, y_strides, h, base, base_strides)
    # y and the base are the caller's: their layouts are part of what the launches specialise on
    variant = (y_strides, y.dtype, base_strides, base.dtype)
    aligned = not (y.data_ptr() | base.data_ptr()) & 15
    bound = plan.forwards.get(variant) if aligned else None
    if bound is not None:
        stream = current_stream()
        bound[0](stream, shrink_args)
        bound[1](stream, expand_args)
    else:  # this variant's first forward: through the launchers, and the launches bound for the next calls
        bound = tuple(launch.bind() for launch in _forward_launches(plan, shrink_args, expand_args))
        if plan.cached and aligned:
            plan.forwards[variant] = bound
    return h


def svd_adapter_backward(dy2d: torch.Tensor, x2d: torch.Tensor, adapter: SVDAdapter, h: torch.Tensor,
                         seed: torch.Tensor, dx: torch.Tensor | None, emission: ImportanceEmission | None = None,
                         plan: SVDAdapterPlan | None = None, accumulate_dx: bool = True):  # fmt: skip
    """(dx, dA, dE, dB) for an upstream gradient dY (N × out): the adapter's dx = dropout'(Gs·A) is added onto
    ``dx`` (N × in) in place.

    ``dx``: the base GEMM's dY·W0 in the fused layer, zeros for the adapter's term alone; None when dx is not
    needed (then None is returned for it). With an ``emission`` (paper order, on the step-completing
    micro-batch) the reduction's epilogues also update the sensitivity EMAs of B, E and A and sum their element
    scores per rank; the triplet score is combined from those r-sized sums. ``plan``: the forward's
    :func:`adapter_plan`, when the caller has it.
    """
    check_seed(seed)
    if plan is None:
        plan = adapter_plan(x2d, adapter, seed)
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    n, k, r_pad, acc = plan.n, plan.k, plan.r_pad, plan.acc
    if n == 0:
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_E), torch.zeros_like(lora_B)
    if not h.is_contiguous():  # the kernels read H as the forward wrote it (N × R_PAD, dense)
        h = h.contiguous()
    scaling = float(adapter.scaling)
    n_tiles, n_splits = plan.n_tiles, plan.n_splits
    ws = torch.empty(plan.ws_size, device=x2d.device, dtype=acc)
    # dA = Gsᵀ·dropout(x) as dAᵀ partials, and the adapter's dx = dropout'(Gs·A): token splits × input tiles.
    d_a, d_e, d_b = torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)
    needs_dx = dx is not None
    grad_h_args, grad_a_x_args, reduce_args, dx_arg = _backward_args(plan, dy2d, x2d, adapter, h, seed, dx, ws, d_a,
                                                                      d_e, d_b)  # fmt: skip
    variant = _backward_variant(dy2d, x2d, h, dx, dx_arg, needs_dx and accumulate_dx)
    accumulate_dx = variant[-1]
    aligned = _aligned(dy2d, x2d, h, dx_arg)
    bound = plan.backwards.get(variant) if aligned else None
    if bound is not None:
        stream = current_stream()
        bound[0](stream, grad_h_args)
        bound[1](stream, grad_a_x_args)
        if emission is None:
            bound[2](stream, reduce_args)
    else:  # this variant's first call: through the launchers, and the launches bound for the next calls
        dots = plan.dots
        grad_h = launch_grad_h.bind((n_tiles,), *grad_h_args, BLOCK_M=GRAD_H_BLOCK_M, R_PAD=r_pad, **dots)
        grad_a_x = launch_grad_a_x.bind(
            lambda meta: (cdiv(k, meta["BLOCK_K"]), n_splits), *grad_a_x_args,
            R_PAD=r_pad, HAS_DROPOUT=plan.has_dropout, HAS_DX=needs_dx, DX_ACCUMULATE=accumulate_dx, **dots,
        )  # fmt: skip
        if emission is None:
            # dB, dA: Σ of grad_h's row-tile and grad_a_x's split partials; dE = s·m·Σ_n H⊙G.
            reduce = launch_grad_reduce.bind(
                (plan.tiles_b + plan.tiles_a + 1,), *reduce_args, BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=r_pad,
                ACC_DTYPE=dots["ACC_DTYPE"], EMIT=False, ACCUMULATE_B=False, ACCUMULATE_A=False, ACCUMULATE_E=False,
            )  # fmt: skip
            if plan.cached and aligned:
                plan.backwards[variant] = (grad_h, grad_a_x, reduce)
    if emission is not None:  # the step-completing micro-batch: the reduction also scores (once per step)
        scores = _reduce_and_emit(plan, ws, d_a, d_e, d_b, adapter, scaling, emission)
        _write_triplet_scores(emission, *scores, lora_A, lora_E, lora_B)
    return dx, d_a, d_e, d_b


def _backward_args(plan: SVDAdapterPlan, dy2d, x2d, adapter: SVDAdapter, h, seed, dx, ws, d_a, d_e, d_b) -> tuple:
    """(grad_h's, grad_a_x's and the reduction's positional arguments, the dx argument) of a backward."""
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    n, k, r, out = plan.n, plan.k, plan.r, plan.out
    p, keep_scale = _dropout_args(adapter.dropout_p)
    scaling = float(adapter.scaling)
    # dY's layout, and x's as the backward sees it (a saved-tensor hook may hand back a copy laid out anew)
    grad_h_args = (dy2d, h, lora_E, adapter.triplet_mask, adapter.ranknum, lora_B, ws, plan.ws_b_offset, n, out, r,
                   scaling, *dy2d.stride(), plan.e_stride, *plan.b_strides)  # fmt: skip
    # without HAS_DX the kernel does not touch dx: a one-element dummy (autotuning copies it between trials)
    dx_arg, dx_strides = (dx, dx.stride()) if dx is not None else (seed, (0, 0))
    grad_a_x_args = (x2d, ws, plan.ws_a_offset, lora_A, dx_arg, n, k, r, plan.rows_per_split, seed, p, keep_scale,
                     *x2d.stride(), *plan.a_strides, *dx_strides)  # fmt: skip
    return grad_h_args, grad_a_x_args, _reduce_args(plan, ws, d_a, d_e, d_b, adapter, scaling), dx_arg


def _backward_variant(dy2d, x2d, h, dx, dx_arg, accumulate_dx: bool) -> tuple:
    """What a backward's bound launches are specialised on beyond the plan: the layouts and dtypes of dY, x, H
    and dx, and whether dx is added onto."""
    dx_strides = dx.stride() if dx is not None else (0, 0)
    return dy2d.stride(), dy2d.dtype, x2d.stride(), x2d.dtype, h.dtype, dx_strides, dx_arg.dtype, accumulate_dx


# ---------------------------------------------------------------------------------------------
# Launch programs: the fused layer as one C++ autograd node (csrc/svd_linear_program.cpp), its bound launches
# replayed from C++ with the frozen layer's GEMMs and the allocations: one op call per layer call.
# ---------------------------------------------------------------------------------------------

# A plan's programs are handles (ints; False where a program cannot be made, None until one is tried).
_PROGRAM_PLANS: dict = {}  # _program_key -> a plan with programs for such calls (the op checks the rest)
_ADD_PROGRAM_PLANS: dict = {}  # the same for the adapter over any other base layer (svd_adapter_add_triton)
_svd_linear_program = _svd_adapter_add_program = None  # the ops' C++ entry points, looked up with the first program
_FORWARD_ONLY = -1  # the backward handle of a call the op runs without an autograd node


def _program_key(x_shape, x_dtype, adapter: SVDAdapter) -> tuple:
    # (the device index too, as the plans hold it: same-shape layers on two GPUs of one process each keep
    # their own programs instead of taking turns at one key, every call declined by the op)
    lora_A = adapter.lora_A
    return x_shape, x_dtype, lora_A.shape, lora_A.dtype, lora_A.get_device(), adapter.lora_B.shape, adapter.dropout_p > 0


def _program_scalars(adapter: SVDAdapter) -> list[float]:
    """The float values a program's constants are made of (the op checks them on every call)."""
    return [float(adapter.scaling), float(adapter.dropout_p)]


def _program_call(x, weight, bias, adapter: SVDAdapter, seed, differentiable: bool = True) -> tuple:
    """(the layer's eager forward as the C++ node, or None where no program applies and the Python path runs;
    the seed for that path). ``differentiable=False``: the forward alone, for a call with nothing to
    differentiate. A call the op declines hands on the seed tensor it drew, so that every call draws one
    dropout seed whichever path runs it (the generator's sequence does not depend on the path)."""
    plan = _PROGRAM_PLANS.get(_program_key(x.shape, x.dtype, adapter))
    if plan is None:
        return None, seed
    backward = plan.programs_backward.get((x.requires_grad,) * 2) if differentiable else _FORWARD_ONLY
    if backward.__class__ is not int:
        return None, seed
    seed = dropout_seed(adapter.dropout_p, x.device, seed)
    out = _svd_linear_program(plan.program_forward, backward, x, weight, bias, adapter.lora_A, adapter.lora_E,
                              adapter.lora_B, adapter.triplet_mask, adapter.ranknum, seed, adapter.fan_in_fan_out,
                              _program_scalars(adapter))  # fmt: skip
    return (out[0] if out else None), seed


def _add_program_call(result, x, adapter: SVDAdapter, out_dtype, seed, differentiable: bool = True) -> tuple:
    """:func:`_program_call` for the adapter over any other base layer (its output ``result``)."""
    plan = _ADD_PROGRAM_PLANS.get(_add_program_key(result, out_dtype, x.shape, x.dtype, adapter))
    if plan is None:
        return None, seed
    backward = plan.programs_backward.get((x.requires_grad, False)) if differentiable else _FORWARD_ONLY
    if backward.__class__ is not int:
        return None, seed
    seed = dropout_seed(adapter.dropout_p, x.device, seed)
    out = _svd_adapter_add_program(plan.programs_forward_add[(out_dtype, result.dtype)], backward, result, x,
                                   adapter.lora_A, adapter.lora_E, adapter.lora_B, adapter.triplet_mask,
                                   adapter.ranknum, seed, out_dtype, _program_scalars(adapter))  # fmt: skip
    return (out[0] if out else None), seed


def _add_program_key(result, out_dtype, x_shape, x_dtype, adapter: SVDAdapter) -> tuple:
    return result.shape, result.dtype, out_dtype, *_program_key(x_shape, x_dtype, adapter)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.is_cuda else 0  # (CPU tensors: the fake driver's device 0, for host-cost runs)


def _resolve_program_ops() -> None:
    """The ops' C++ entry points (an OpOverload's call is a Python frame around it)."""
    global _svd_linear_program, _svd_adapter_add_program
    ops = torch.ops.adalora_fast
    _svd_linear_program = getattr(ops.svd_linear_program.default, "_op", ops.svd_linear_program.default)
    _svd_adapter_add_program = getattr(ops.svd_adapter_add_program.default, "_op", ops.svd_adapter_add_program.default)


def _serve_from_programs(plan: SVDAdapterPlan, x2d, adapter: SVDAdapter, seed, y, h, x_shape) -> None:
    """After a Python-path forward of the fused layer on a cached plan: its forward program made (once), and
    calls on an x of ``x_shape`` sent to the plan, which serves those with nothing to differentiate from C++ and
    the others once it has their backward program. (A plan serves every x flattened to its rows: each shape is
    sent here by its own first call.)"""
    if plan.program_forward is None:
        plan.program_forward = _forward_program(plan, x2d, adapter, seed, y, h, y)
    if plan.program_forward.__class__ is int:
        _PROGRAM_PLANS[_program_key(x_shape, x2d.dtype, adapter)] = plan


def _serve_add_from_programs(plan: SVDAdapterPlan, x2d, adapter: SVDAdapter, seed, y, h, result, x_shape) -> None:
    """:func:`_serve_from_programs` for the adapter over any other base layer: ``result`` its output."""
    key = (y.dtype, result.dtype)
    if plan.programs_forward_add.get(key) is None:
        base = result.reshape(x2d.shape[0], result.shape[-1])
        plan.programs_forward_add[key] = _forward_program(plan, x2d, adapter, seed, y, h, base)
    if plan.programs_forward_add[key].__class__ is int:
        _ADD_PROGRAM_PLANS[_add_program_key(result, y.dtype, x_shape, x2d.dtype, adapter)] = plan


def _forward_program(plan: SVDAdapterPlan, x2d, adapter: SVDAdapter, seed, y, h, base):
    """After a forward bound its launches onto a dense y and ``base`` (y itself for the fused layer): the handle
    of the program that replays them; False where a launch cannot be replayed from C++, or where the extension's
    build does not launch on x's device (a CUDA build launches on CUDA tensors, a CPU build on the fake
    driver's); None where nothing was bound (tried again by the next call)."""
    from ..extension import extension_has_cuda

    if x2d.is_cuda != extension_has_cuda():
        return False
    bound = plan.forwards.get((y.stride(), y.dtype, base.stride(), base.dtype))
    if bound is None or not y.is_contiguous():
        return None
    slots = (x2d, adapter.lora_A, adapter.lora_E, adapter.lora_B, adapter.triplet_mask, adapter.ranknum, seed, h, y,
             base)  # fmt: skip
    args = _forward_args(plan, x2d, adapter, seed, y, y.stride(), h, base, base.stride())
    launches = [program_launch(b, a, slots) for b, a in zip(bound, args)]
    if any(launch is None for launch in launches):
        return False
    _resolve_program_ops()
    return make_program(slots, launches, _program_scalars(adapter), _device_index(x2d), False)


def _make_backward_program(plan: SVDAdapterPlan, dy2d, x2d, adapter: SVDAdapter, h, seed, dx, accumulate_dx) -> None:
    """After a backward (without emission) bound its launches: the program that replays them, for calls with dx
    (added onto the frozen layer's: ``accumulate_dx``) or without (plan.programs_backward[(needs dx, adds onto
    it)], made once; the plan serves them from C++ from then on)."""
    needs_dx = dx is not None
    accumulate_dx = needs_dx and accumulate_dx
    key = (needs_dx, accumulate_dx)
    if key in plan.programs_backward:
        return
    dx_arg = dx if needs_dx else seed
    bound = plan.backwards.get(_backward_variant(dy2d, x2d, h, dx, dx_arg, accumulate_dx))
    if bound is None or not (dy2d.is_contiguous() and x2d.is_contiguous() and h.is_contiguous()):
        return
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    ws = torch.empty(plan.ws_size, device=x2d.device, dtype=plan.acc)  # (placeholders, laid out as a call's)
    d_a, d_e, d_b = torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)
    slots = (dy2d, x2d, lora_A, lora_E, lora_B, adapter.triplet_mask, adapter.ranknum, h, seed, ws, d_a, d_e, d_b,
             dx_arg)  # fmt: skip
    args = _backward_args(plan, dy2d, x2d, adapter, h, seed, dx, ws, d_a, d_e, d_b)[:3]
    launches = [program_launch(b, a, slots) for b, a in zip(bound, args)]
    if any(launch is None for launch in launches):
        plan.programs_backward[key] = False
        return
    _resolve_program_ops()
    plan.programs_backward[key] = make_program(slots, launches, _program_scalars(adapter), _device_index(x2d),
                                               needs_dx)  # fmt: skip


class PlannedLaunch(NamedTuple):
    """One kernel launch of an adapter call, as its plan makes it: ``launcher(grid, *args, **constexprs)``
    launches it through its :class:`~.launch.CachedLauncher`, ``launcher.kernel[grid](*args, **constexprs)``
    is the same launch through Triton's whole path, and :meth:`bind` the plan's bound launch of it."""

    launcher: CachedLauncher
    grid: Callable[[dict], tuple]  # of the launch's meta-parameters, as for ``kernel[grid]``
    args: tuple
    constexprs: dict

    def bind(self) -> BoundLaunch:
        """Launch it once and return that launch as a :class:`~.launch.BoundLaunch`."""
        return self.launcher.bind(self.grid, *self.args, **self.constexprs)


def forward_launches(x2d: torch.Tensor, adapter: SVDAdapter, seed: torch.Tensor,
                     y: torch.Tensor) -> tuple[PlannedLaunch, PlannedLaunch]:  # fmt: skip
    """The two launches (shrink, expand) that :func:`svd_adapter_forward` makes for these operands onto ``y``
    (with a fresh H), unlaunched: what a forward's launches cost the host, measured one path at a time
    (``benchmarks/host_overhead.py``)."""
    check_seed(seed)
    plan = adapter_plan(x2d, adapter, seed)
    h = torch.empty(plan.n, plan.r_pad, device=x2d.device, dtype=plan.acc)
    return _forward_launches(plan, *_forward_args(plan, x2d, adapter, seed, y, y.stride(), h, y, y.stride()))


def _forward_args(plan: SVDAdapterPlan, x2d, adapter: SVDAdapter, seed, y, y_strides, h, base,
                  base_strides) -> tuple[tuple, tuple]:  # fmt: skip
    """The positional arguments of the forward's shrink and expand launches."""
    p, keep_scale = _dropout_args(adapter.dropout_p)
    n, r = plan.n, plan.r
    shrink = (x2d, adapter.lora_A, h, n, plan.k, r, seed, p, keep_scale, *plan.x_strides, *plan.a_strides)
    expand = (h, adapter.lora_E, adapter.triplet_mask, adapter.ranknum, adapter.lora_B, base, y, n, plan.out, r,
              float(adapter.scaling), plan.e_stride, *plan.b_strides, *base_strides, *y_strides)  # fmt: skip
    return shrink, expand


def _forward_launches(plan: SVDAdapterPlan, shrink_args: tuple, expand_args: tuple) -> tuple[PlannedLaunch, ...]:
    n, out, dots = plan.n, plan.out, plan.dots
    return (
        PlannedLaunch(launch_shrink, lambda meta: (cdiv(n, meta["BLOCK_M"]),), shrink_args,
                      dict(R_PAD=plan.r_pad, HAS_DROPOUT=plan.has_dropout, **dots)),
        PlannedLaunch(launch_expand, lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(out, meta["BLOCK_N"])),
                      expand_args, dict(R_PAD=plan.r_pad, **dots)),
    )  # fmt: skip


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    """(p, 1 / (1 - p)) as the kernels take them: floats always (Triton specialises on the argument's type)."""
    p = float(dropout_p)
    return p, (1.0 / (1.0 - p) if p > 0 else 1.0)


@torch.no_grad()
def _write_triplet_scores(emission: ImportanceEmission, score_e, score_sum_a, score_sum_b, lora_A, lora_E, lora_B):
    """The triplet score from the epilogues' per-rank element scores (E) and score sums (A, B): E's score plus
    the means of A's and B's, in E's dtype (as the references combine them); then the emission is done."""
    r = lora_E.shape[0]
    s_a = (score_sum_a[:r] / lora_A.shape[1]).to(lora_E.dtype)
    s_b = (score_sum_b[:r] / lora_B.shape[0]).to(lora_E.dtype)
    emission.triplet_score.copy_(score_e[:r].to(lora_E.dtype) + (s_a + s_b))
    emission.done()


def _emission_operands(emission: ImportanceEmission, index: int, name: str, param: torch.Tensor,
                       grad: torch.Tensor):  # fmt: skip
    """((param, previous grad, Ī, Ū), accumulate?) for the reduction's importance epilogue."""
    ipt, unc = emission.exp_avg_ipt[index], emission.exp_avg_unc[index]
    prev = param.grad
    if prev is not None and prev.stride() != grad.stride():
        prev = torch.empty_like(grad).copy_(prev)
    if not (param.stride() == grad.stride() == ipt.stride() == unc.stride()):
        raise RuntimeError(f"{name}: the parameter, its gradient and its importance buffers must share one layout")
    return (param, (prev if prev is not None else param), ipt, unc), prev is not None


def _inverse_grad_scale(scale, device) -> torch.Tensor:
    """1 / the loss scale the gradients carry (a one-element fp32 device tensor; no host sync)."""
    if scale is None:
        return torch.ones(1, device=device, dtype=torch.float32)
    if isinstance(scale, torch.Tensor):
        return torch.reciprocal(scale.to(device=device, dtype=torch.float32).reshape(1))
    return torch.full((1,), 1.0 / scale, device=device, dtype=torch.float32)


def _reduce_args(plan: SVDAdapterPlan, ws, d_a, d_e, d_b, adapter: SVDAdapter, scaling: float,
                 emitting: tuple | None = None) -> tuple:  # fmt: skip
    """The reduction's arguments: the workspace and its regions' offsets, then per factor its output and the
    importance operands (param, previous grad, Ī, Ū; dummies it does not touch without EMIT), the score
    partials, 1 / loss scale, the rank scale's operands and the EMA betas."""
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    if emitting is None:
        ops_b, ops_a, ops_e = (lora_B,) * 4, (lora_A,) * 4, (lora_E,) * 4
        scores = inv_scale = ws
        betas = 0.0, 1.0, 0.0, 1.0
    else:
        ops_b, ops_a, ops_e, scores, inv_scale, betas = emitting
    db_rows, db_ranks, da_rows, da_ranks, de_ranks = plan.grad_strides
    return (
        ws, plan.ws_a_offset, plan.ws_b_offset,
        d_b, *ops_b, plan.out, plan.n_tiles, db_rows, db_ranks,
        d_a, *ops_a, plan.k, plan.n_splits, da_rows, da_ranks,
        d_e, *ops_e, de_ranks,
        scores, inv_scale, adapter.triplet_mask, adapter.ranknum, scaling, plan.r, *betas,
    )  # fmt: skip


def _reduce_and_emit(plan: SVDAdapterPlan, ws, d_a, d_e, d_b, adapter: SVDAdapter, scaling: float,
                     emission: ImportanceEmission):  # fmt: skip
    """dB, dA and dE (written into d_b, d_a, d_e) = Σ of their partials, in one launch whose epilogues also
    score the final gradients: returns E's scores and the per-rank sums of A's and B's element scores."""
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    (ops_b, acc_b), (ops_a, acc_a), (ops_e, acc_e) = (
        _emission_operands(emission, index, name, param, grad)
        for index, name, param, grad in ((2, "lora_B", lora_B, d_b), (0, "lora_A", lora_A, d_a),
                                         (1, "lora_E", lora_E, d_e))  # fmt: skip
    )
    tiles_b, tiles_a = plan.tiles_b, plan.tiles_a
    scores = torch.empty((tiles_b + tiles_a + 1, plan.r_pad), device=d_b.device, dtype=torch.float32)
    inv_scale = _inverse_grad_scale(emission.grad_scale, d_b.device)
    betas = emission.beta1, 1 - emission.beta1, emission.beta2, 1 - emission.beta2
    launch_grad_reduce(
        (tiles_b + tiles_a + 1,),
        *_reduce_args(plan, ws, d_a, d_e, d_b, adapter, scaling, (ops_b, ops_a, ops_e, scores, inv_scale, betas)),
        BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=plan.r_pad, ACC_DTYPE=plan.dots["ACC_DTYPE"], EMIT=True,
        ACCUMULATE_B=acc_b, ACCUMULATE_A=acc_a, ACCUMULATE_E=acc_e,
    )  # fmt: skip
    return scores[tiles_b + tiles_a], scores[tiles_b : tiles_b + tiles_a].sum(dim=0), scores[:tiles_b].sum(dim=0)


# ---------------------------------------------------------------------------------------------
# Plans: what a call decides from its operands' layout, decided once
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _token_splits(n: int, k: int, device) -> int:
    """How many token splits grad_a_x uses: enough programs to fill the device, each with a useful share of rows."""
    if device.type == "cuda":
        programs_wanted = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        programs_wanted = 8
    in_tiles = cdiv(k, 64)
    return max(1, min(cdiv(n, GRAD_A_MIN_ROWS_PER_SPLIT), cdiv(programs_wanted, in_tiles)))


class SVDAdapterPlan:
    """Everything an adapter call decides from its operands' shapes, strides, dtypes and alignment: the
    workspace shapes, the grids, the constexprs and each launch bound to its compiled kernel
    (:class:`~.launch.BoundLaunch`). One plan serves every call on operands laid out alike (the layers of a
    model that share a shape share it), so a steady-state call allocates and launches, and decides nothing.

    The launches are bound by the first forward of each variant (the layout of the y it adds onto) and the
    first backward of each variant (dY's layout, x's as unpacked, dx's or none), through their
    :class:`~.launch.CachedLauncher` (Triton's path, autotuning included, the first time a kernel meets this
    specialization).
    """

    __slots__ = ("n", "k", "r", "out", "r_pad", "acc", "dots", "has_dropout", "n_tiles", "n_splits",
                 "rows_per_split", "tiles_b", "tiles_a", "ws_a_offset", "ws_b_offset", "ws_size", "x_strides",
                 "a_strides", "e_stride", "b_strides", "grad_strides", "forwards", "backwards", "cached",
                 "program_forward", "programs_forward_add", "programs_backward")  # fmt: skip

    def __init__(self, x2d: torch.Tensor, adapter: SVDAdapter, cached: bool):
        lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
        self.n, self.k = x2d.shape
        self.r, self.out = lora_A.shape[0], lora_B.shape[0]
        self.r_pad = rank_pad(self.r)
        self.acc = accumulate_dtype(lora_A.dtype)
        self.dots = dot_settings(x2d.dtype, lora_A.dtype)
        self.has_dropout = adapter.dropout_p > 0
        self.n_tiles = cdiv(self.n, GRAD_H_BLOCK_M)
        self.n_splits = _token_splits(self.n, self.k, x2d.device) if self.n else 1
        self.rows_per_split = cdiv(self.n, self.n_splits)
        self.tiles_b, self.tiles_a = cdiv(self.out, REDUCE_BLOCK_ROWS), cdiv(self.k, REDUCE_BLOCK_ROWS)
        # The backward's one workspace (see svd_adapter.py): Gs, then the dA partials, then the dB partials
        # with dE's as an extra row per row tile. Every region starts 16-element aligned (R_PAD >= 16).
        self.ws_a_offset = self.n * self.r_pad
        self.ws_b_offset = self.ws_a_offset + self.n_splits * self.k * self.r_pad
        self.ws_size = self.ws_b_offset + self.n_tiles * (self.out + 1) * self.r_pad
        # Strides in the key, read once: the operands' and the gradients' (empty_like keeps a dense layout)
        self.x_strides, self.a_strides, self.b_strides = x2d.stride(), lora_A.stride(), lora_B.stride()
        self.e_stride = lora_E.stride(0)
        d_a, d_e, d_b = (torch.empty_like(t) for t in (lora_A, lora_E, lora_B))
        self.grad_strides = (*d_b.stride(), d_a.stride(1), d_a.stride(0), d_e.stride(0))
        self.forwards: dict = {}  # (y's strides and dtype) -> (shrink, expand)
        self.backwards: dict = {}  # (dY's, x's, H's and dx's layouts and dtypes) -> (grad_h, grad_a_x, reduce)
        self.cached = cached  # False: an operand is not 16-byte aligned, this plan serves one call
        # The launches replayed from C++ (made once the first calls have bound them; False: they cannot be):
        # the fused layer's forward, the forward over another base layer, and the backwards
        self.program_forward = None
        self.programs_forward_add: dict = {}  # (y's dtype, the base output's) -> the forward over another base
        self.programs_backward: dict = {}  # (needs dx, adds it onto the frozen layer's) -> handle


_PLANS: dict = {}
MAX_PLANS = 4096  # a bound, not a working size: past it the cache starts over


def _aligned(*tensors) -> bool:
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    return not ptrs & 15


def adapter_plan(x2d: torch.Tensor, adapter: SVDAdapter, seed: torch.Tensor) -> SVDAdapterPlan:
    """The plan for an adapter call on these operands (cached per layout; ``adapter.triplet_mask`` must be a
    tensor, ``seed`` the dropout seed tensor).

    Its key holds everything its bound launches were specialised on: the shapes and strides (every int the
    kernels take is made of them), the dtypes, whether dropout is on, the device and whether direct launches
    are on; every pointer must be 16-byte aligned, else the plan is made for this call alone. The tensors a
    call allocates (H, the workspace, the gradients) are taken to be aligned, as torch's allocators give them;
    the caller's y and dx are checked per call, and their layouts pick the plan's bound launches.
    """
    lora_A, lora_E, lora_B, mask, ranknum = (adapter.lora_A, adapter.lora_E, adapter.lora_B, adapter.triplet_mask,
                                             adapter.ranknum)  # fmt: skip
    key = (x2d.shape, x2d.stride(), x2d.dtype, lora_A.shape, lora_A.stride(), lora_A.dtype, lora_E.stride(0),
           lora_E.dtype, lora_B.shape, lora_B.stride(), lora_B.dtype, mask.dtype, ranknum.dtype, adapter.dropout_p > 0,
           x2d.device, current_device(), direct_launch_enabled())  # fmt: skip
    if not _aligned(x2d, lora_A, lora_E, lora_B, mask, ranknum, seed):
        return SVDAdapterPlan(x2d, adapter, cached=False)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            clear_plans()
        plan = _PLANS[key] = SVDAdapterPlan(x2d, adapter, cached=True)
    return plan


def clear_plans() -> None:
    """Forget every plan (the next call per layout binds its launches again) and every launch program; also
    done by :func:`~.launch.clear_all`."""
    _PLANS.clear()
    _PROGRAM_PLANS.clear()
    _ADD_PROGRAM_PLANS.clear()
    if _svd_linear_program is not None:  # (a node still in a graph keeps its programs)
        torch.ops.adalora_fast.clear_launch_programs()


on_clear_all(clear_plans)


# ---------------------------------------------------------------------------------------------
# Dropout seeds and the all-ones triplet mask
# ---------------------------------------------------------------------------------------------


_UNUSED_SEED: dict = {}


def _outside_capture(device) -> bool:
    """Whether a cached buffer may be made now: not while a CUDA graph is being captured (its fill would only
    run at the first replay)."""
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def dropout_seed(dropout_p: float, device, seed: int | None = None) -> torch.Tensor:
    """The one-element int64 tensor on ``device`` that the kernels read the dropout seed from.

    ``seed=None`` draws it on the device from torch's generator (reproducible under
    ``torch.manual_seed``; no host sync; inside a CUDA graph each replay draws a fresh one).
    Without dropout the kernels do not read it: a shared uninitialised placeholder is returned. A seed tensor
    (one this function returned) is returned as it is.
    """
    if isinstance(seed, torch.Tensor):
        return seed
    if dropout_p <= 0:  # one cached placeholder per device (made outside a capture, like the ones mask)
        unused = _UNUSED_SEED.get(device)
        if unused is None:
            if not _outside_capture(torch.device(device)):
                return torch.empty(1, dtype=torch.int64, device=device)
            with torch.inference_mode(False):
                unused = _UNUSED_SEED[device] = torch.empty(1, dtype=torch.int64, device=device)
        return unused
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def check_seed(seed) -> None:
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError(f"the dropout seed must be a one-element int64 tensor (see dropout_seed()), got {seed!r}")


_ONES: dict[tuple, torch.Tensor] = {}


def unit_mask(r: int, device, dtype) -> torch.Tensor:
    """A triplet mask of r ones (layers without one, e.g. PEFT's): one cached read-only view per (r, device,
    dtype), so that no layer launches a fill for it in every forward.

    Made outside inference mode (an inference tensor cannot be saved for a later training backward), and
    not cached while a CUDA graph is being captured.
    """
    key = (r, device, dtype)
    ones = _ONES.get(key)
    if ones is None:
        if not _outside_capture(device):
            return torch.ones(r, device=device, dtype=dtype)
        with torch.inference_mode(False):
            ones = _ONES[key] = torch.ones(r, device=device, dtype=dtype)
    return ones


def svd_adapter_dropout_mask(seed: int | torch.Tensor, n: int, k: int, dropout_p: float, device) -> torch.Tensor:
    """The (n × k) keep mask the kernels draw for ``seed``: lets a reference replay the same dropout."""
    out = torch.empty((n, k), device=device, dtype=torch.float32)
    seed_t = torch.as_tensor(seed, dtype=torch.int64).to(device).reshape(1)
    if n and k:
        _dropout_keep_mask_kernel[(cdiv(n, 32), cdiv(k, 32))](out, n, k, seed_t, dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
