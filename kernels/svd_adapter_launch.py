"""Launchers of the SVD adapter's kernels (:mod:`.svd_adapter`): workspaces, grids, dropout seeds and the
importance epilogue's operands, each kernel through a :class:`~.launch.CachedLauncher`.

``svd_adapter_forward`` and ``svd_adapter_backward`` take the adapter as one
:class:`~adalora_fast.adapter.SVDAdapter`; they are what the autograd path (:mod:`.svd_adapter_op`) calls,
and what the bandwidth benchmarks call without it.
"""

from __future__ import annotations

import functools

import torch

from ..adapter import SVDAdapter
from ..importance import ImportanceEmission
from .launch import CachedLauncher
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


def _dropout_args(dropout_p: float) -> tuple[float, float, bool]:
    return dropout_p, (1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0), dropout_p > 0


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
# Forward
# ---------------------------------------------------------------------------------------------


def svd_adapter_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter,
                        seed: torch.Tensor, base_gemm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """y (N × out) and H = dropout(x)·Aᵀ (N × R_PAD, fp32, kept for the backward).

    ``adapter.triplet_mask`` must be a tensor here (:func:`unit_mask` for none); ``seed``: the dropout seed
    tensor (:func:`dropout_seed`). ``base_gemm=False`` leaves out x·W0ᵀ (the adapter kernels alone, for
    bandwidth measurements).
    """
    check_seed(seed)
    lora_A, lora_E, lora_B, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
    n, k = x2d.shape
    r, out = lora_A.shape[0], lora_B.shape[0]
    r_pad = rank_pad(r)
    h = torch.empty((n, r_pad), device=x2d.device, dtype=accumulate_dtype(lora_A.dtype))
    y = torch.empty((n, out), device=x2d.device, dtype=x2d.dtype)
    if n == 0:
        return y, h
    p, keep_scale, has_dropout = _dropout_args(dropout_p)
    dots = dot_settings(x2d.dtype, lora_A.dtype)
    launch_shrink(
        lambda meta: (cdiv(n, meta["BLOCK_M"]),),
        x2d, lora_A, h, n, k, r, seed, p, keep_scale,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1),
        R_PAD=r_pad, HAS_DROPOUT=has_dropout, **dots,
    )  # fmt: skip
    launch_expand(
        lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(out, meta["BLOCK_N"])),
        h, lora_E, mask, ranknum, lora_B, bias if bias is not None else h, y, n, out, r, float(scaling),
        lora_E.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        R_PAD=r_pad, HAS_BIAS=bias is not None, **dots,
    )  # fmt: skip
    if base_gemm:  # the base GEMM accumulates onto the adapter term (beta = 1): no separate pass over y
        y.addmm_(x2d, weight if fan_in_fan_out else weight.t())
    return y, h


# ---------------------------------------------------------------------------------------------
# Backward
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


def svd_adapter_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, adapter: SVDAdapter,
                         h: torch.Tensor, seed: torch.Tensor, needs_dx: bool, importance=None,
                         base_gemm: bool = True):  # fmt: skip
    """(dx or None, dA, dE, dB) for an upstream gradient dY (N × out).

    With an ``importance`` :class:`~adalora_fast.importance.ImportanceEmission` (paper order, on the
    step-completing micro-batch) the reduction's epilogues also update the sensitivity EMAs of B, E and A and
    sum their element scores per rank; the triplet score is combined from those r-sized sums.
    """
    check_seed(seed)
    lora_A, lora_E, lora_B, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
    n, k = x2d.shape
    r, out = lora_A.shape[0], lora_B.shape[0]
    r_pad = rank_pad(r)
    dev = x2d.device
    if n == 0:
        dx = torch.zeros_like(x2d) if needs_dx else None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_E), torch.zeros_like(lora_B)
    p, keep_scale, has_dropout = _dropout_args(dropout_p)
    dots = dot_settings(x2d.dtype, lora_A.dtype)
    n_tiles = cdiv(n, GRAD_H_BLOCK_M)
    acc = accumulate_dtype(lora_A.dtype)
    gs = torch.empty((n, r_pad), device=dev, dtype=acc)
    ws_b = torch.empty((n_tiles, out, r_pad), device=dev, dtype=acc)
    ws_e = torch.empty((n_tiles, r_pad), device=dev, dtype=acc)
    launch_grad_h(
        (n_tiles,),
        dy2d, h, lora_E, mask, ranknum, lora_B, gs, ws_b, ws_e, n, out, r, float(scaling),
        dy2d.stride(0), dy2d.stride(1), lora_E.stride(0), lora_B.stride(0), lora_B.stride(1),
        BLOCK_M=GRAD_H_BLOCK_M, R_PAD=r_pad, **dots,
    )  # fmt: skip
    # dA = Gsᵀ·dropout(x) as dAᵀ partials, and the adapter's dx = dropout'(Gs·A): token splits × input tiles.
    n_splits = _token_splits(n, k, dev)
    rows_per_split = cdiv(n, n_splits)
    ws_a = torch.empty((n_splits, k, r_pad), device=dev, dtype=acc)
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format) if needs_dx else None
    dx_arg = dx if needs_dx else ws_a  # a dummy the kernel does not touch without HAS_DX
    launch_grad_a_x(
        lambda meta: (cdiv(k, meta["BLOCK_K"]), n_splits),
        x2d, gs, lora_A, ws_a, dx_arg, n, k, r, rows_per_split, seed, p, keep_scale,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        R_PAD=r_pad, HAS_DROPOUT=has_dropout, HAS_DX=needs_dx, **dots,
    )  # fmt: skip
    # dB, dA: Σ of grad_h's row-tile and grad_a_x's split partials; dE_i = s·m_i/(ranknum + ε)·Σ_m H_mi·G_mi.
    d_a, d_e, d_b = torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)
    scores = _reduce_factor_grads(ws_a, ws_e, ws_b, d_a, d_e, d_b, adapter, r_pad, importance, dots["ACC_DTYPE"])
    if importance is not None:
        _write_triplet_scores(importance, *scores, lora_A, lora_E, lora_B)
    if needs_dx and base_gemm:
        dx.addmm_(dy2d, weight.t() if fan_in_fan_out else weight)  # base dx GEMM onto the adapter term
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


def _reduce_factor_grads(ws_a, ws_e, ws_b, d_a, d_e, d_b, adapter: SVDAdapter, r_pad: int, importance, acc_dtype):
    """dB, dA and dE (written into d_b, d_a, d_e) = Σ of their partials, in one launch.

    With ``importance``, the epilogues score the final gradients and this returns E's scores and the
    per-rank sums of A's and B's element scores (r_pad each), else None.
    """
    lora_A, lora_E, lora_B, mask, ranknum, scaling, _, _ = adapter
    out, k = d_b.shape[0], d_a.shape[1]
    tiles_b, tiles_a = cdiv(out, REDUCE_BLOCK_ROWS), cdiv(k, REDUCE_BLOCK_ROWS)
    emit = importance is not None
    if emit:
        (ops_b, acc_b), (ops_a, acc_a), (ops_e, acc_e) = (
            _importance_operands(importance, index, name, param, grad)
            for index, name, param, grad in ((2, "lora_B", lora_B, d_b), (0, "lora_A", lora_A, d_a),
                                             (1, "lora_E", lora_E, d_e))  # fmt: skip
        )
        scores = torch.empty((tiles_b + tiles_a + 1, r_pad), device=d_b.device, dtype=torch.float32)
        inv_scale = _inverse_grad_scale(importance.grad_scale, d_b.device)
        betas = importance.beta1, 1 - importance.beta1, importance.beta2, 1 - importance.beta2
    else:  # dummies the kernel does not touch without EMIT
        ops_b, ops_a, ops_e = (lora_B,) * 4, (lora_A,) * 4, (lora_E,) * 4
        acc_b = acc_a = acc_e = False
        scores = inv_scale = ws_e
        betas = 0.0, 1.0, 0.0, 1.0
    launch_grad_reduce(
        (tiles_b + tiles_a + 1,),
        ws_b, d_b, *ops_b, out, ws_b.shape[0], d_b.stride(0), d_b.stride(1),
        ws_a, d_a, *ops_a, k, ws_a.shape[0], d_a.stride(1), d_a.stride(0),
        ws_e, d_e, *ops_e, d_e.stride(0),
        scores, inv_scale, mask, ranknum, float(scaling), lora_A.shape[0], *betas,
        BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=r_pad, ACC_DTYPE=acc_dtype, EMIT=emit,
        ACCUMULATE_B=acc_b, ACCUMULATE_A=acc_a, ACCUMULATE_E=acc_e,
    )  # fmt: skip
    if not emit:
        return None
    return scores[tiles_b + tiles_a], scores[tiles_b : tiles_b + tiles_a].sum(dim=0), scores[:tiles_b].sum(dim=0)
