"""Launchers of the SVD adapter's kernels (:mod:`.svd_adapter`): workspaces, grids, dropout seeds and the
importance epilogue's operands, each kernel through a :class:`~.launch.CachedLauncher`.

``svd_adapter_forward`` and ``svd_adapter_backward`` take the adapter as one
:class:`~adalora_fast.adapter.SVDAdapter`; they are what the autograd path (:mod:`.svd_adapter_op`) calls,
and what the bandwidth benchmarks call without it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..adapter import SVDAdapter
from ..importance import ImportanceEmission
from .launch import CachedLauncher, current_device, current_stream, direct_launch_enabled, on_clear_all
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
from .utils import accumulate_dtype, cdiv, dot_settings, rank_pad

# Each kernel through a CachedLauncher: Triton's own path (autotuning included) once per specialization, then
# the compiled kernel's launcher directly (on a GPU with a verified Triton; ``kernel[grid](...)`` otherwise).
# Launches are the fixed cost of small layers.
launch_shrink = CachedLauncher(svd_adapter_shrink)
launch_expand = CachedLauncher(svd_adapter_expand)
launch_grad_h = CachedLauncher(svd_adapter_grad_h)
launch_grad_reduce = CachedLauncher(svd_adapter_grad_reduce)
launch_grad_a_x = CachedLauncher(svd_adapter_grad_a_x)


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
    Without dropout the kernels do not read it: a shared uninitialised placeholder is returned.
    """
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

    The launches are bound by the first forward, and the first backward of each variant (dY's layout, x's as
    unpacked, dx wanted or not), through their :class:`~.launch.CachedLauncher` (Triton's path, autotuning
    included, the first time a kernel meets this specialization).
    """

    __slots__ = ("n", "k", "r", "out", "r_pad", "acc", "dots", "has_dropout", "n_tiles", "n_splits",
                 "rows_per_split", "tiles_b", "tiles_a", "ws_a_offset", "ws_b_offset", "ws_size", "x_strides",
                 "a_strides", "e_stride", "b_strides", "grad_strides", "forward", "backwards", "cached")  # fmt: skip

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
        self.forward = None  # (shrink, expand), bound by the first forward
        self.backwards: dict = {}  # (dY's and x's layouts and dtypes, H's dtype, dx wanted) -> (grad_h, grad_a_x, reduce)
        self.cached = cached  # False: an operand is not 16-byte aligned, this plan serves one call


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
    call allocates (H, y, dx, the workspace, the gradients) are taken to be aligned, as torch's allocators
    give them.
    """
    lora_A, lora_E, lora_B, mask, ranknum, _, _, dropout_p = adapter
    key = (x2d.shape, x2d.stride(), x2d.dtype, lora_A.shape, lora_A.stride(), lora_A.dtype, lora_E.stride(0),
           lora_E.dtype, lora_B.shape, lora_B.stride(), lora_B.dtype, mask.dtype, ranknum.dtype, dropout_p > 0,
           x2d.device, current_device(), direct_launch_enabled())  # fmt: skip
    if not _aligned(x2d, lora_A, lora_E, lora_B, mask, ranknum, seed):
        return SVDAdapterPlan(x2d, adapter, cached=False)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = SVDAdapterPlan(x2d, adapter, cached=True)
    return plan


def clear_plans() -> None:
    """Forget every plan (the next call per layout binds its launches again); also done by
    :func:`~.launch.clear_all`."""
    _PLANS.clear()


on_clear_all(clear_plans)


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    """(p, 1 / (1 - p)) as the kernels take them: floats always (Triton specialises on the argument's type)."""
    p = float(dropout_p)
    return p, (1.0 / (1.0 - p) if p > 0 else 1.0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def svd_adapter_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter,
                        seed: torch.Tensor, base_gemm: bool = True,
                        plan: SVDAdapterPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (N × out) and H = dropout(x)·Aᵀ (N × R_PAD, fp32, kept for the backward).

    ``adapter.triplet_mask`` must be a tensor here (:func:`unit_mask` for none); ``seed``: the dropout seed
    tensor (:func:`dropout_seed`). ``base_gemm=False`` leaves out x·W0ᵀ + b (the adapter kernels alone, onto
    zeros: for bandwidth measurements). ``plan``: :func:`adapter_plan` of these operands, when the caller has it.
    """
    check_seed(seed)
    if plan is None:
        plan = adapter_plan(x2d, adapter, seed)
    lora_A, lora_E, lora_B, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
    n, k, r, out, r_pad = plan.n, plan.k, plan.r, plan.out, plan.r_pad
    # The frozen layer's GEMM first (bias in cuBLAS's epilogue); the adapter adds its term onto y.
    if not base_gemm:
        y = torch.zeros(n, out, device=x2d.device, dtype=x2d.dtype)
    elif fan_in_fan_out:
        y = x2d.mm(weight) if bias is None else torch.addmm(bias, x2d, weight)
    else:
        y = F.linear(x2d, weight, bias)
    h = torch.empty(n, r_pad, device=x2d.device, dtype=plan.acc)  # (sizes as arguments: a faster parse than a tuple)
    if n == 0:
        return y, h
    p, keep_scale = _dropout_args(dropout_p)
    shrink_args = (x2d, lora_A, h, n, k, r, seed, p, keep_scale, *plan.x_strides, *plan.a_strides)
    expand_args = (h, lora_E, mask, ranknum, lora_B, y, n, out, r, float(scaling), plan.e_stride, *plan.b_strides,
                   *y.stride())  # fmt: skip
    bound = plan.forward
    if bound is not None:
        stream = current_stream()
        bound[0](stream, shrink_args)
        bound[1](stream, expand_args)
    else:  # the plan's first forward: through the launchers, and the launches bound for the next calls
        dots = plan.dots
        bound = (
            launch_shrink.bind(lambda meta: (cdiv(n, meta["BLOCK_M"]),), *shrink_args, R_PAD=r_pad,
                               HAS_DROPOUT=plan.has_dropout, **dots),
            launch_expand.bind(lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(out, meta["BLOCK_N"])), *expand_args,
                               R_PAD=r_pad, **dots),
        )  # fmt: skip
        if plan.cached:
            plan.forward = bound
    return y, h


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def svd_adapter_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, adapter: SVDAdapter,
                         h: torch.Tensor, seed: torch.Tensor, needs_dx: bool, importance=None,
                         base_gemm: bool = True, plan: SVDAdapterPlan | None = None):  # fmt: skip
    """(dx or None, dA, dE, dB) for an upstream gradient dY (N × out).

    With an ``importance`` :class:`~adalora_fast.importance.ImportanceEmission` (paper order, on the
    step-completing micro-batch) the reduction's epilogues also update the sensitivity EMAs of B, E and A and
    sum their element scores per rank; the triplet score is combined from those r-sized sums.
    ``plan``: the forward's :func:`adapter_plan`, when the caller has it.
    """
    check_seed(seed)
    if plan is None:
        plan = adapter_plan(x2d, adapter, seed)
    lora_A, lora_E, lora_B, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
    n, k, r, out, r_pad, acc = plan.n, plan.k, plan.r, plan.out, plan.r_pad, plan.acc
    dev = x2d.device
    if n == 0:
        dx = torch.zeros_like(x2d) if needs_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_E), torch.zeros_like(lora_B)
    if not h.is_contiguous():  # the kernels read H as the forward wrote it (N × R_PAD, dense)
        h = h.contiguous()
    p, keep_scale = _dropout_args(dropout_p)
    scaling = float(scaling)
    n_tiles, n_splits = plan.n_tiles, plan.n_splits
    ws = torch.empty(plan.ws_size, device=dev, dtype=acc)
    # dA = Gsᵀ·dropout(x) as dAᵀ partials, and the adapter's dx = dropout'(Gs·A): token splits × input tiles.
    dx = None
    if needs_dx:  # the base GEMM's dY·W0 first: grad_a_x adds the adapter's term onto it
        if base_gemm:
            dx = dy2d.mm(weight.t() if fan_in_fan_out else weight)
        else:
            dx = torch.zeros(n, k, device=dev, dtype=x2d.dtype)
    d_a, d_e, d_b = torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)
    # dY's layout, and x's as the backward sees it (a saved-tensor hook may hand back a copy laid out anew)
    dy_strides, x_strides = dy2d.stride(), x2d.stride()
    grad_h_args = (dy2d, h, lora_E, mask, ranknum, lora_B, ws, plan.ws_b_offset, n, out, r, scaling, *dy_strides,
                   plan.e_stride, *plan.b_strides)  # fmt: skip
    # without HAS_DX the kernel does not touch dx: a one-element dummy (autotuning copies it between trials)
    dx_arg, dx_strides = (dx, dx.stride()) if needs_dx else (seed, (0, 0))
    grad_a_x_args = (x2d, ws, plan.ws_a_offset, lora_A, dx_arg, n, k, r, plan.rows_per_split, seed, p, keep_scale,
                     *x_strides, *plan.a_strides, *dx_strides)  # fmt: skip
    reduce_args = _reduce_args(plan, ws, d_a, d_e, d_b, adapter, scaling)
    variant = (dy_strides, dy2d.dtype, x_strides, x2d.dtype, h.dtype, needs_dx)
    aligned = _aligned(dy2d, x2d, h)
    bound = plan.backwards.get(variant) if aligned else None
    if bound is not None:
        stream = current_stream()
        bound[0](stream, grad_h_args)
        bound[1](stream, grad_a_x_args)
        if importance is None:
            bound[2](stream, reduce_args)
    else:  # this variant's first call: through the launchers, and the launches bound for the next calls
        dots = plan.dots
        grad_h = launch_grad_h.bind((n_tiles,), *grad_h_args, BLOCK_M=GRAD_H_BLOCK_M, R_PAD=r_pad, **dots)
        grad_a_x = launch_grad_a_x.bind(
            lambda meta: (cdiv(k, meta["BLOCK_K"]), n_splits), *grad_a_x_args,
            R_PAD=r_pad, HAS_DROPOUT=plan.has_dropout, HAS_DX=needs_dx, **dots,
        )  # fmt: skip
        if importance is None:
            # dB, dA: Σ of grad_h's row-tile and grad_a_x's split partials; dE = s·m/(ranknum + ε)·Σ_m H⊙G.
            reduce = launch_grad_reduce.bind(
                (plan.tiles_b + plan.tiles_a + 1,), *reduce_args, BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=r_pad,
                ACC_DTYPE=dots["ACC_DTYPE"], EMIT=False, ACCUMULATE_B=False, ACCUMULATE_A=False, ACCUMULATE_E=False,
            )  # fmt: skip
            if plan.cached and aligned:
                plan.backwards[variant] = (grad_h, grad_a_x, reduce)
    if importance is not None:  # the step-completing micro-batch: the reduction also scores (once per step)
        scores = _reduce_emitting_importance(plan, ws, d_a, d_e, d_b, adapter, scaling, importance)
        _write_triplet_scores(importance, *scores, lora_A, lora_E, lora_B)
    return dx, d_a, d_e, d_b


@torch.no_grad()
def _write_triplet_scores(importance: ImportanceEmission, score_e, score_sum_a, score_sum_b, lora_A, lora_E, lora_B):
    """The triplet score from the epilogues' per-rank element scores (E) and score sums (A, B): E's score plus
    the means of A's and B's, in E's dtype (as the references combine them); then the emission is done."""
    r = lora_E.shape[0]
    s_a = (score_sum_a[:r] / lora_A.shape[1]).to(lora_E.dtype)
    s_b = (score_sum_b[:r] / lora_B.shape[0]).to(lora_E.dtype)
    importance.triplet_score.copy_(score_e[:r].to(lora_E.dtype) + (s_a + s_b))
    importance.done()


def _importance_operands(importance: ImportanceEmission, index: int, name: str, param: torch.Tensor,
                         grad: torch.Tensor):  # fmt: skip
    """((param, previous grad, Ī, Ū), accumulate?) for the reduction's importance epilogue."""
    ipt, unc = importance.exp_avg_ipt[index], importance.exp_avg_unc[index]
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
    lora_A, lora_E, lora_B, mask, ranknum = adapter[:5]
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
        scores, inv_scale, mask, ranknum, scaling, plan.r, *betas,
    )  # fmt: skip


def _reduce_emitting_importance(plan: SVDAdapterPlan, ws, d_a, d_e, d_b, adapter: SVDAdapter, scaling: float,
                                importance: ImportanceEmission):  # fmt: skip
    """dB, dA and dE (written into d_b, d_a, d_e) = Σ of their partials, in one launch whose epilogues also
    score the final gradients: returns E's scores and the per-rank sums of A's and B's element scores."""
    lora_A, lora_E, lora_B = adapter.lora_A, adapter.lora_E, adapter.lora_B
    (ops_b, acc_b), (ops_a, acc_a), (ops_e, acc_e) = (
        _importance_operands(importance, index, name, param, grad)
        for index, name, param, grad in ((2, "lora_B", lora_B, d_b), (0, "lora_A", lora_A, d_a),
                                         (1, "lora_E", lora_E, d_e))  # fmt: skip
    )
    tiles_b, tiles_a = plan.tiles_b, plan.tiles_a
    scores = torch.empty((tiles_b + tiles_a + 1, plan.r_pad), device=d_b.device, dtype=torch.float32)
    inv_scale = _inverse_grad_scale(importance.grad_scale, d_b.device)
    betas = importance.beta1, 1 - importance.beta1, importance.beta2, 1 - importance.beta2
    launch_grad_reduce(
        (tiles_b + tiles_a + 1,),
        *_reduce_args(plan, ws, d_a, d_e, d_b, adapter, scaling, (ops_b, ops_a, ops_e, scores, inv_scale, betas)),
        BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=plan.r_pad, ACC_DTYPE=plan.dots["ACC_DTYPE"], EMIT=True,
        ACCUMULATE_B=acc_b, ACCUMULATE_A=acc_a, ACCUMULATE_E=acc_e,
    )  # fmt: skip
    return scores[tiles_b + tiles_a], scores[tiles_b : tiles_b + tiles_a].sum(dim=0), scores[:tiles_b].sum(dim=0)
