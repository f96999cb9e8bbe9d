"""Fused Triton forward and backward of AdaLoRA's SVD adapter.

    y = x·W0ᵀ + b + s·dropout(x)·Qᵀ·diag(Λ⊙m)·Pᵀ,     s = scaling / (ranknum + 1e-5)

Q = lora_A (r × in), Λ = lora_E (r × 1), m = triplet_mask (r), P = lora_B (out × r).
The rank lives in one register tile of R_PAD = max(16, next_pow2(r)) columns
(padding masked), where ``s·Λ⊙m`` is applied for free. Dropout is drawn inside
the kernels from a seed and regenerated in the backward; the only activations
saved are x itself and H = dropout(x)·Qᵀ (N × R_PAD, fp32).

Forward (2 kernels + the base GEMM):
  shrink   H = dropout(x)·Qᵀ                               one pass over x
  expand   y = (H·diag(sΛm))·Pᵀ + b                        writes y once
  cuBLAS   y += x·W0ᵀ   (addmm with beta = 1: the adapter term is read in the GEMM's epilogue)
Backward (3 launches + the base dx GEMM, no other device op):
  grad_h   G = dY·P, and per row tile the partial dP = dYᵀ·(H·diag(sΛm))   one pass over dY
           epilogue: Gs = G·diag(sΛm), partial Σ H⊙G for dΛ
  grad_q_x per token split × input tile: dQᵀ partials = dropout(x)ᵀ·Gs and dx = dropout'(Gs·Q)
           one pass over x and Gs, one dropout draw for both
  reduce   one grid, three regions, each summing partials in a fixed order (deterministic, no atomics):
           dP = Σ of grad_h's row-tile partials, dQ = Σ of grad_q_x's split partials,
           dΛ = s·m/(ranknum + 1e-5)·Σ of grad_h's Σ H⊙G partials (a one-row factor)
  cuBLAS   dx += dY·W0 (beta = 1)
Paper-order importance is emitted by the ``reduce`` epilogues, where dP, dΛ and dQ become final.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .importance import gradient_total, update_importance
from .launch import CachedLauncher
from .utils import (
    accumulate_dtype,
    apply_dropout,
    cdiv,
    dot_settings,
    dropout_keep,
    dropout_tile,
    interpreting,
    rank_pad,
    tile_configs,
    tile_dot,
)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rank_scale(mask_ptr, ranknum_ptr, scaling, R, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """m·s/(ranknum + 1e-5) as a [R_PAD] vector in the accumulation dtype, zero in the padding."""
    ranks = tl.arange(0, R_PAD)
    keep = tl.load(mask_ptr + ranks, mask=ranks < R, other=0.0).to(ACC_DTYPE)
    return keep * (scaling / (tl.load(ranknum_ptr).to(ACC_DTYPE) + 1e-5))


@triton.jit
def _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD: tl.constexpr,
                               ACC_DTYPE: tl.constexpr):  # fmt: skip
    """s·Λ⊙m as a [R_PAD] vector in the accumulation dtype, zero in the padding."""
    ranks = tl.arange(0, R_PAD)
    lam = tl.load(E_ptr + ranks * stride_e, mask=ranks < R, other=0.0).to(ACC_DTYPE)
    return lam * _rank_scale(mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)


@triton.jit
def _load_input_tile(X_ptr, rows, col0, N, K, stride_xm, stride_xk, SEED_ptr, dropout_p, keep_scale,
                     HAS_DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):  # fmt: skip
    """dropout(x)[rows, col0 : col0 + BLOCK_K] in the compute dtype: cast first, as PEFT casts x to the
    adapter's dtype before its dropout. The forward and the backward draw the same mask."""
    cols = col0 + tl.arange(0, BLOCK_K)
    x = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
    if HAS_DROPOUT:
        x = dropout_tile(x, rows, col0, K, SEED_ptr, dropout_p, keep_scale, BLOCK_K)
    return x


@triton.jit
def _svd_adapter_shrink_kernel(
    X_ptr, Q_ptr, H_ptr, N, K, R, SEED_ptr, dropout_p, keep_scale,
    stride_xm, stride_xk, stride_qr, stride_qk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_input_tile(X_ptr, rows, k0, N, K, stride_xm, stride_xk, SEED_ptr, dropout_p, keep_scale, HAS_DROPOUT,
                             BLOCK_K, COMPUTE_DTYPE)  # fmt: skip
        q_t = tl.load(Q_ptr + ranks[None, :] * stride_qr + cols[:, None] * stride_qk,
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        acc = tile_dot(x, q_t, acc, UPCAST, DOT_PRECISION)
    tl.store(H_ptr + rows[:, None] * R_PAD + ranks[None, :], acc, mask=rows[:, None] < N)


@triton.jit
def _svd_adapter_expand_kernel(
    H_ptr, E_ptr, mask_ptr, ranknum_ptr, P_ptr, bias_ptr, Y_ptr, N, OUT, R, scaling,
    stride_e, stride_pn, stride_pr, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    lam = _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)
    h = tl.load(H_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < N, other=0.0)
    p_t = tl.load(P_ptr + cols[None, :] * stride_pn + ranks[:, None] * stride_pr,
                  mask=(cols[None, :] < OUT) & (ranks[:, None] < R), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
    u = (h * lam[None, :]).to(COMPUTE_DTYPE)
    acc = tile_dot(u, p_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < OUT, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(Y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < OUT))  # fmt: skip


@triton.jit
def _svd_adapter_grad_h_kernel(
    DY_ptr, H_ptr, E_ptr, mask_ptr, ranknum_ptr, P_ptr, GS_ptr, WSP_ptr, WSL_ptr, N, OUT, R, scaling,
    stride_dym, stride_dyn, stride_e, stride_pn, stride_pr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    lam = _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)
    h = tl.load(H_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < N, other=0.0)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    u = (h * lam[None, :]).to(COMPUTE_DTYPE)  # this row tile of H·diag(sΛm), for the dP partials
    for n0 in range(0, OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=(rows[:, None] < N) & (cols[None, :] < OUT), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        p = tl.load(P_ptr + cols[:, None] * stride_pn + ranks[None, :] * stride_pr,
                    mask=(cols[:, None] < OUT) & (ranks[None, :] < R), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        g = tile_dot(dy, p, g, UPCAST, DOT_PRECISION)
        # This row tile's share of dP = dYᵀ·(H·diag(sΛm)), summed over tiles by the reduce kernel.
        part = tile_dot(tl.trans(dy), u, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
        tl.store(WSP_ptr + (tile * OUT + cols[:, None]) * R_PAD + ranks[None, :], part, mask=cols[:, None] < OUT)
    tl.store(GS_ptr + rows[:, None] * R_PAD + ranks[None, :], g * lam[None, :], mask=rows[:, None] < N)
    tl.store(WSL_ptr + tile * R_PAD + ranks, tl.sum(h * g, axis=0))


@triton.jit
def _reduce_factor_tile(
    tile, score_row, WS_ptr, DG_ptr, W_ptr, PREV_ptr, IPT_ptr, UNC_ptr, SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr,
    scaling, ROWS, R, n_parts, stride_row, stride_rank, beta1, one_minus_beta1, beta2, one_minus_beta2,
    BLOCK_ROWS: tl.constexpr, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, EMIT: tl.constexpr,
    ACCUMULATE: tl.constexpr, RANK_SCALE: tl.constexpr,
):  # fmt: skip
    """One row tile of a factor's gradient = Σ of n_parts partials (n_parts × ROWS × R_PAD), in order: P,
    Q seen as Qᵀ, or Λ seen as one row (with RANK_SCALE, the sum is multiplied by m·s/(ranknum + 1e-5)).

    Where the gradient is final, the paper-order epilogue: sensitivity, both EMAs in place, and this
    tile's per-rank sums of the element scores (over P's rows, or Q's columns; Λ's own scores) written
    to row ``score_row`` of SCORE.
    """
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_ROWS, R_PAD), dtype=ACC_DTYPE)
    for t in range(0, n_parts):  # fixed order: bitwise reproducible
        acc += tl.load(WS_ptr + (t * ROWS + rows[:, None]) * R_PAD + ranks[None, :], mask=rows[:, None] < ROWS, other=0.0)
    if RANK_SCALE:
        acc *= _rank_scale(mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)[None, :]
    offs = rows[:, None] * stride_row + ranks[None, :] * stride_rank
    valid = (rows[:, None] < ROWS) & (ranks[None, :] < R)
    tl.store(DG_ptr + offs, acc.to(DG_ptr.dtype.element_ty), mask=valid)
    if EMIT:
        g = gradient_total(acc, PREV_ptr + offs, valid, ACCUMULATE) * tl.load(INV_SCALE_ptr)
        w = tl.load(W_ptr + offs, mask=valid, other=0.0)
        score = update_importance(w, g, IPT_ptr + offs, UNC_ptr + offs, valid, beta1, one_minus_beta1, beta2, one_minus_beta2)
        tl.store(SCORE_ptr + score_row * R_PAD + ranks, tl.sum(score, axis=0))


@triton.jit
def _svd_adapter_grad_reduce_kernel(
    WSP_ptr, DP_ptr, P_ptr, PREVP_ptr, IPTP_ptr, UNCP_ptr, ROWS_P, parts_p, stride_dpn, stride_dpr,
    WSQ_ptr, DQ_ptr, Q_ptr, PREVQ_ptr, IPTQ_ptr, UNCQ_ptr, ROWS_Q, parts_q, stride_dqk, stride_dqr,
    WSL_ptr, DE_ptr, E_ptr, PREVE_ptr, IPTE_ptr, UNCE_ptr, stride_de,
    SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, R, beta1, one_minus_beta1, beta2, one_minus_beta2,
    BLOCK_ROWS: tl.constexpr, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, EMIT: tl.constexpr,
    ACCUMULATE_P: tl.constexpr, ACCUMULATE_Q: tl.constexpr, ACCUMULATE_E: tl.constexpr,
):  # fmt: skip
    """dP, dQ and dΛ from their partials in one launch: programs [0, P's row tiles) reduce dP, the next
    Qᵀ's row tiles reduce dQ, and the last one reduces dΛ (grad_h's Σ H⊙G partials, one row, scaled)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_p = tl.cdiv(ROWS_P, BLOCK_ROWS)
    tiles_q = tl.cdiv(ROWS_Q, BLOCK_ROWS)
    if pid < tiles_p:
        _reduce_factor_tile(pid, pid, WSP_ptr, DP_ptr, P_ptr, PREVP_ptr, IPTP_ptr, UNCP_ptr, SCORE_ptr, INV_SCALE_ptr,
                            mask_ptr, ranknum_ptr, scaling, ROWS_P, R, parts_p, stride_dpn, stride_dpr,
                            beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_P, False)  # fmt: skip
    elif pid < tiles_p + tiles_q:
        _reduce_factor_tile(pid - tiles_p, pid, WSQ_ptr, DQ_ptr, Q_ptr, PREVQ_ptr, IPTQ_ptr, UNCQ_ptr, SCORE_ptr,
                            INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, ROWS_Q, R, parts_q, stride_dqk, stride_dqr,
                            beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_Q, False)  # fmt: skip
    else:  # Λ: grad_h made its partials with P's, one per row tile
        _reduce_factor_tile(0, pid, WSL_ptr, DE_ptr, E_ptr, PREVE_ptr, IPTE_ptr, UNCE_ptr, SCORE_ptr,
                            INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, 1, R, parts_p, 0, stride_de,
                            beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_E, True)  # fmt: skip


@triton.jit
def _svd_adapter_grad_q_x_kernel(
    X_ptr, GS_ptr, Q_ptr, WSQ_ptr, DX_ptr, N, K, R, rows_per_split, SEED_ptr, dropout_p, keep_scale,
    stride_xm, stride_xk, stride_qr, stride_qk, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_DX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    """One token split × input tile: its share of dQ = Gsᵀ·dropout(x), stored as dQᵀ partials (split, K,
    R_PAD), and (HAS_DX) the adapter's dx = dropout'(Gs·Q) on the same rows and columns: one pass over x
    and Gs, one dropout draw for both."""
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    split = tl.program_id(1).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=ACC_DTYPE)
    if HAS_DX:
        q = tl.load(Q_ptr + ranks[:, None] * stride_qr + cols[None, :] * stride_qk,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = _load_input_tile(X_ptr, rows, col0, end, K, stride_xm, stride_xk, SEED_ptr, dropout_p, keep_scale, False,
                             BLOCK_K, COMPUTE_DTYPE)  # fmt: skip
        if HAS_DROPOUT:
            keep = dropout_keep(rows, col0, K, SEED_ptr, dropout_p, BLOCK_K)
            x = apply_dropout(x, keep, keep_scale)
        gs_t = tl.load(GS_ptr + rows[None, :] * R_PAD + ranks[:, None], mask=rows[None, :] < end, other=0.0)
        acc = tile_dot(gs_t.to(COMPUTE_DTYPE), x, acc, UPCAST, DOT_PRECISION)
        if HAS_DX:
            gs = tl.load(GS_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < end, other=0.0)
            du = tile_dot(gs.to(COMPUTE_DTYPE), q, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
            if HAS_DROPOUT:
                du = apply_dropout(du, keep, keep_scale)
            tl.store(DX_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, du.to(DX_ptr.dtype.element_ty),
                     mask=(rows[:, None] < end) & (cols[None, :] < K))  # fmt: skip
    tl.store(WSQ_ptr + (split * K + cols[None, :]) * R_PAD + ranks[:, None], acc, mask=cols[None, :] < K)


# ---------------------------------------------------------------------------------------------
# Tile configurations: a short curated list per kernel, keyed on the shape; one config in the interpreter.
# ---------------------------------------------------------------------------------------------

# Rows are (tile sizes..., num_warps, num_stages); the last argument is the interpreter's single config.
# Every list holds, for every rank pad, at least one config whose registers do not spill on sm_90 and
# sm_80 (the in-kernel dropout's Philox state is what spills first; compile_check reports it).
ROW_TILE_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_K"), [(64, 128, 8, 3), (128, 64, 8, 3), (64, 256, 8, 2), (32, 128, 4, 4)], (16, 32, 4, 1)
)
OUTPUT_TILE_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_N"), [(128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4)], (16, 32, 4, 1)
)
GRAD_Q_X_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_K"), [(64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 3)], (16, 32, 4, 1)
)
# grad_h's BLOCK_M sets the number of dP partials, and the reduction's BLOCK_ROWS the number of score
# partials (both allocated before the launch), so the launcher fixes those and the rest is tuned.
GRAD_H_BLOCK_M = 16 if interpreting() else 64
GRAD_H_CONFIGS = tile_configs(("BLOCK_N",), [(64, 8, 3), (128, 8, 3), (64, 4, 3), (32, 8, 3)], (32, 4, 1))
REDUCE_BLOCK_ROWS = 32 if interpreting() else 64
REDUCE_CONFIGS = tile_configs((), [(4, 1), (8, 1)], (4, 1))
# grad_q_x splits the tokens so that in × splits fills the GPU; the splits' dQ partials are reduced in order.
GRAD_Q_MIN_ROWS_PER_SPLIT = 16 if interpreting() else 512

# The autotuned entry points; the raw jit functions above are what the ahead-of-time compile test builds.
svd_adapter_shrink = triton.autotune(ROW_TILE_CONFIGS, key=["K", "R_PAD", "HAS_DROPOUT"])(_svd_adapter_shrink_kernel)
svd_adapter_expand = triton.autotune(OUTPUT_TILE_CONFIGS, key=["OUT", "R_PAD", "HAS_BIAS"])(_svd_adapter_expand_kernel)
svd_adapter_grad_h = triton.autotune(GRAD_H_CONFIGS, key=["OUT", "R_PAD"])(_svd_adapter_grad_h_kernel)
# The importance EMAs are updated in place: autotuning restores them after each trial.
_EMA_ARGS = ["IPTP_ptr", "UNCP_ptr", "IPTQ_ptr", "UNCQ_ptr", "IPTE_ptr", "UNCE_ptr"]
svd_adapter_grad_reduce = triton.autotune(
    REDUCE_CONFIGS, key=["ROWS_P", "ROWS_Q", "R_PAD", "EMIT"], restore_value=_EMA_ARGS
)(_svd_adapter_grad_reduce_kernel)
svd_adapter_grad_q_x = triton.autotune(GRAD_Q_X_CONFIGS, key=["K", "R_PAD", "HAS_DROPOUT", "HAS_DX"])(
    _svd_adapter_grad_q_x_kernel
)

# What the launchers call: each kernel through a CachedLauncher, which takes Triton's own path (autotuning
# included) once per specialization and then calls the compiled kernel's launcher directly (on a GPU with
# a verified Triton; ``kernel[grid](...)`` otherwise). Launches are the fixed cost of small layers.
launch_shrink = CachedLauncher(svd_adapter_shrink)
launch_expand = CachedLauncher(svd_adapter_expand)
launch_grad_h = CachedLauncher(svd_adapter_grad_h)
launch_grad_reduce = CachedLauncher(svd_adapter_grad_reduce)
launch_grad_q_x = CachedLauncher(svd_adapter_grad_q_x)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _dropout_args(dropout_p: float) -> tuple[float, float, bool]:
    return dropout_p, (1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0), dropout_p > 0


_UNUSED_SEED: dict = {}


def dropout_seed(dropout_p: float, device, seed: int | None = None) -> torch.Tensor:
    """The one-element int64 tensor on ``device`` that the kernels read the dropout seed from.

    ``seed=None`` draws it on the device from torch's generator (reproducible under
    ``torch.manual_seed``; no host sync; inside a CUDA graph each replay draws a fresh one).
    Without dropout the kernels do not read it: a shared uninitialised placeholder is returned.
    """
    if dropout_p <= 0:  # one cached placeholder per device (made outside a capture, like the ones mask)
        unused = _UNUSED_SEED.get(device)
        if unused is None:
            unused = torch.empty(1, dtype=torch.int64, device=device)
            if not (unused.is_cuda and torch.cuda.is_current_stream_capturing()):
                with torch.inference_mode(False):
                    unused = _UNUSED_SEED[device] = torch.empty(1, dtype=torch.int64, device=device)
        return unused
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def svd_adapter_forward(x2d, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling,
                        fan_in_fan_out: bool, dropout_p: float, seed: torch.Tensor, base_gemm: bool = True):  # fmt: skip
    """y (N × out) and H = dropout(x)·Qᵀ (N × R_PAD, fp32, kept for the backward).

    ``seed``: the dropout seed tensor (:func:`dropout_seed`).

    ``base_gemm=False`` leaves out x·W0ᵀ (the adapter kernels alone, for bandwidth measurements).
    """
    _check_seed(seed)
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
        h, lora_E, triplet_mask, ranknum, lora_B, bias if bias is not None else h, y, n, out, r, float(scaling),
        lora_E.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        R_PAD=r_pad, HAS_BIAS=bias is not None, **dots,
    )  # fmt: skip
    if base_gemm:  # the base GEMM accumulates onto the adapter term (beta = 1): no separate pass over y
        y.addmm_(x2d, weight if fan_in_fan_out else weight.t())
    return y, h


def _check_seed(seed) -> None:
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError(f"the dropout seed must be a one-element int64 tensor (see dropout_seed()), got {seed!r}")


def _importance_operands(importance, name: str, param: torch.Tensor, grad: torch.Tensor):
    """((param, previous grad, Ī, Ū), accumulate?) for a kernel epilogue; dummies when not emitting."""
    if importance is None:
        return (param, param, param, param), False
    ipt, unc = importance.kernel_args(name)
    prev = param.grad
    if prev is not None and prev.stride() != grad.stride():
        prev = torch.empty_like(grad).copy_(prev)
    if not (param.stride() == grad.stride() == ipt.stride() == unc.stride()):
        raise RuntimeError(f"{name}: the parameter, its gradient and its importance buffers must share one layout")
    return (param, (prev if prev is not None else param), ipt, unc), prev is not None


def _inverse_grad_scale(importance, device) -> torch.Tensor:
    """1 / the loss scale the gradients carry (a one-element fp32 device tensor; no host sync); None
    when nothing is emitted."""
    if importance is None:
        return None
    scale = importance.grad_scale
    if scale is None:
        return torch.ones(1, device=device, dtype=torch.float32)
    if isinstance(scale, torch.Tensor):
        return torch.reciprocal(scale.to(device=device, dtype=torch.float32).reshape(1))
    return torch.full((1,), 1.0 / scale, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _token_splits(n: int, k: int, device) -> int:
    """How many token splits grad_q_x uses: enough programs to fill the device, each with a useful share of rows."""
    if device.type == "cuda":
        programs_wanted = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        programs_wanted = 8
    in_tiles = cdiv(k, 64)
    return max(1, min(cdiv(n, GRAD_Q_MIN_ROWS_PER_SPLIT), cdiv(programs_wanted, in_tiles)))


def _reduce_factor_grads(ws_p, ws_q, ws_l, d_b, d_a, d_e, lora_B, lora_A, lora_E, triplet_mask, ranknum, scaling, r,
                         r_pad, importance, acc_dtype):  # fmt: skip
    """dP, dQ and dΛ (written into d_b, d_a, d_e) = Σ of their partials, in one launch.

    With ``importance``, the epilogues score the final gradients and this returns Λ's scores and the
    per-rank sums of Q's and P's element scores (r_pad each), else None.
    """
    out, k = d_b.shape[0], d_a.shape[1]
    tiles_p, tiles_q = cdiv(out, REDUCE_BLOCK_ROWS), cdiv(k, REDUCE_BLOCK_ROWS)
    (ops_p, acc_p), (ops_q, acc_q), (ops_e, acc_e) = (
        _importance_operands(importance, name, param, grad)
        for name, param, grad in (("lora_B", lora_B, d_b), ("lora_A", lora_A, d_a), ("lora_E", lora_E, d_e))
    )
    emit = importance is not None
    scores = torch.empty((tiles_p + tiles_q + 1, r_pad), device=d_b.device, dtype=torch.float32) if emit else ws_l
    inv_scale = _inverse_grad_scale(importance, d_b.device)
    launch_grad_reduce(
        (tiles_p + tiles_q + 1,),
        ws_p, d_b, *ops_p, out, ws_p.shape[0], d_b.stride(0), d_b.stride(1),
        ws_q, d_a, *ops_q, k, ws_q.shape[0], d_a.stride(1), d_a.stride(0),
        ws_l, d_e, *ops_e, d_e.stride(0),
        scores, inv_scale if emit else ws_l, triplet_mask, ranknum, float(scaling), r, *_beta_args(importance),
        BLOCK_ROWS=REDUCE_BLOCK_ROWS, R_PAD=r_pad, ACC_DTYPE=acc_dtype, EMIT=emit,
        ACCUMULATE_P=acc_p, ACCUMULATE_Q=acc_q, ACCUMULATE_E=acc_e,
    )  # fmt: skip
    if not emit:
        return None
    return scores[tiles_p + tiles_q], scores[tiles_p : tiles_p + tiles_q].sum(dim=0), scores[:tiles_p].sum(dim=0)


def _beta_args(importance) -> tuple[float, float, float, float]:
    if importance is None:
        return 0.0, 1.0, 0.0, 1.0
    return importance.beta1, 1 - importance.beta1, importance.beta2, 1 - importance.beta2


def svd_adapter_backward(dy2d, x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, h,
                         fan_in_fan_out: bool, dropout_p: float, seed: torch.Tensor, needs_dx: bool, importance=None,
                         base_gemm: bool = True):  # fmt: skip
    """(dx or None, dQ, dΛ, dP) for an upstream gradient dY (N × out).

    With an ``importance`` state (paper order, on the step-completing micro-batch) the reduction's
    epilogues also update the sensitivity EMAs of P, Λ and Q and sum their element scores per rank; the
    triplet score is combined from those r-sized sums.
    """
    _check_seed(seed)
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
    ws_p = torch.empty((n_tiles, out, r_pad), device=dev, dtype=acc)
    ws_l = torch.empty((n_tiles, r_pad), device=dev, dtype=acc)
    launch_grad_h(
        (n_tiles,),
        dy2d, h, lora_E, triplet_mask, ranknum, lora_B, gs, ws_p, ws_l, n, out, r, float(scaling),
        dy2d.stride(0), dy2d.stride(1), lora_E.stride(0), lora_B.stride(0), lora_B.stride(1),
        BLOCK_M=GRAD_H_BLOCK_M, R_PAD=r_pad, **dots,
    )  # fmt: skip
    # dQ = Gsᵀ·dropout(x) as dQᵀ partials, and the adapter's dx = dropout'(Gs·Q): token splits × input tiles.
    n_splits = _token_splits(n, k, dev)
    rows_per_split = cdiv(n, n_splits)
    ws_q = torch.empty((n_splits, k, r_pad), device=dev, dtype=acc)
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format) if needs_dx else None
    dx_arg = dx if needs_dx else ws_q  # a dummy the kernel does not touch without HAS_DX
    launch_grad_q_x(
        lambda meta: (cdiv(k, meta["BLOCK_K"]), n_splits),
        x2d, gs, lora_A, ws_q, dx_arg, n, k, r, rows_per_split, seed, p, keep_scale,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        R_PAD=r_pad, HAS_DROPOUT=has_dropout, HAS_DX=needs_dx, **dots,
    )  # fmt: skip
    # dP, dQ: Σ of grad_h's row-tile and grad_q_x's split partials; dΛ_i = s·m_i/(ranknum + 1e-5)·Σ_m H_mi·G_mi.
    d_a, d_e, d_b = torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)
    scores = _reduce_factor_grads(ws_p, ws_q, ws_l, d_b, d_a, d_e, lora_B, lora_A, lora_E, triplet_mask, ranknum,
                                  scaling, r, r_pad, importance, dots["ACC_DTYPE"])  # fmt: skip
    if importance is not None:
        importance.finish_from_kernels(*scores)
    if needs_dx and base_gemm:
        dx.addmm_(dy2d, weight.t() if fan_in_fan_out else weight)  # base dx GEMM onto the adapter term
    return dx, d_a, d_e, d_b


class SVDLinearFunction(torch.autograd.Function):
    """The whole SVD-adapted linear layer on the fused kernels (the frozen GEMMs on cuBLAS)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p,
                seed, importance):  # fmt: skip
        x2d = x.reshape(-1, x.shape[-1])
        y, h = svd_adapter_forward(
            x2d, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p, seed
        )
        ctx.save_for_backward(x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h)
        ctx.scaling, ctx.fan_in_fan_out, ctx.dropout_p, ctx.seed = scaling, fan_in_fan_out, dropout_p, seed
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        ctx.importance = importance  # an ImportanceState when this backward emits the sensitivity, else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        needs = ctx.needs_input_grad
        dx, d_a, d_e, d_b = svd_adapter_backward(
            dy2d, x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, ctx.scaling, h,
            ctx.fan_in_fan_out, ctx.dropout_p, ctx.seed, needs[0], ctx.importance,
        )  # fmt: skip
        d_w, d_bias = _base_param_grads(dy2d, x2d, needs[1], ctx.has_bias and needs[2], ctx.fan_in_fan_out)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dx, d_w, d_bias, d_a, d_e, d_b, None, None, None, None, None, None, None


def _base_param_grads(dy2d, x2d, needs_weight: bool, needs_bias: bool, fan_in_fan_out: bool):
    """Gradients of a trainable base weight / bias (unusual for AdaLoRA, but supported)."""
    d_w = None
    if needs_weight:
        d_w = dy2d.t().mm(x2d)
        d_w = d_w.t() if fan_in_fan_out else d_w
    return d_w, (dy2d.sum(dim=0) if needs_bias else None)


# ---------------------------------------------------------------------------------------------
# torch.library ops: the same launchers as opaque custom ops with fake implementations, so that
# torch.compile(fullgraph=True) traces a FastSVDLinear without a graph break.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("adalora_fast::svd_linear_forward", mutates_args=())
def svd_linear_forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, ranknum: torch.Tensor, scaling: float, fan_in_fan_out: bool,
    dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, H, the dropout seed tensor the backward reuses). ``seed < 0`` draws one on the device."""
    seed_t = (dropout_seed(dropout_p, x.device, None if seed < 0 else seed) if dropout_p > 0
              else torch.empty(1, dtype=torch.int64, device=x.device))  # an op's output is its own tensor
    x2d = x.reshape(-1, x.shape[-1])
    y, h = svd_adapter_forward(
        x2d, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p, seed_t
    )
    return y.view(*x.shape[:-1], y.shape[-1]), h, seed_t


@svd_linear_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p, seed):
    n = x.numel() // x.shape[-1]
    y = x.new_empty((*x.shape[:-1], lora_B.shape[0]))
    h = x.new_empty((n, rank_pad(lora_A.shape[0])), dtype=accumulate_dtype(lora_A.dtype))
    return y, h, x.new_empty((1,), dtype=torch.int64)


@torch.library.custom_op("adalora_fast::svd_linear_backward", mutates_args=())
def svd_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_E: torch.Tensor,
    lora_B: torch.Tensor, triplet_mask: torch.Tensor, ranknum: torch.Tensor, h: torch.Tensor, seed: torch.Tensor,
    scaling: float, fan_in_fan_out: bool, dropout_p: float, needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dQ, dΛ, dP); dx is empty when not needed (a custom op returns tensors only)."""
    x2d = x.reshape(-1, x.shape[-1])
    dx, d_a, d_e, d_b = svd_adapter_backward(
        dy.reshape(-1, dy.shape[-1]), x2d, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, h,
        fan_in_fan_out, dropout_p, seed, needs_dx,
    )  # fmt: skip
    return (dx.view(x.shape) if dx is not None else x.new_empty(0)), d_a, d_e, d_b


@svd_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h, seed, scaling, fan_in_fan_out, dropout_p,
      needs_dx):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_E), torch.empty_like(lora_B)


def _forward_op_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, scaling, fan_in_fan_out, dropout_p, _ = inputs
    _, h, seed = output
    ctx.mark_non_differentiable(h, seed)
    ctx.save_for_backward(x, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h, seed)
    ctx.scaling, ctx.fan_in_fan_out, ctx.dropout_p, ctx.has_bias = scaling, fan_in_fan_out, dropout_p, bias is not None


def _forward_op_backward(ctx, dy, _dh, _dseed):
    x, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, d_a, d_e, d_b = svd_linear_backward_op(
        dy, x, weight, lora_A, lora_E, lora_B, triplet_mask, ranknum, h, seed, ctx.scaling, ctx.fan_in_fan_out,
        ctx.dropout_p, needs[0],
    )  # fmt: skip
    d_w, d_bias = _base_param_grads(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), needs[1],
                                    ctx.has_bias and needs[2], ctx.fan_in_fan_out)  # fmt: skip
    return (dx if needs[0] else None), d_w, d_bias, d_a, d_e, d_b, None, None, None, None, None, None


svd_linear_forward_op.register_autograd(_forward_op_backward, setup_context=_forward_op_setup_context)


_ONES: dict[tuple, torch.Tensor] = {}


def _unmasked(r: int, device, dtype) -> torch.Tensor:
    """A keep mask of r ones (layers without a triplet mask, e.g. PEFT's): one cached read-only buffer per
    device and dtype, so that no layer launches a fill for it in every forward.

    Made outside inference mode (an inference tensor cannot be saved for a later training backward), and
    not cached while a CUDA graph is being captured (its fill would only run at the first replay).
    """
    ones = _ONES.get((device, dtype))
    if ones is None or ones.numel() < r:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.ones(r, device=device, dtype=dtype)
        with torch.inference_mode(False):
            ones = _ONES[device, dtype] = torch.ones(max(64, r), device=device, dtype=dtype)
    return ones[:r]


def svd_linear_triton(x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, *,
                      fan_in_fan_out: bool = False, dropout_p: float = 0.0, training: bool = False,
                      seed: int | None = None, importance=None):  # fmt: skip
    """``base(x) + s·dropout(x)·Qᵀ·diag(Λ⊙mask)·Pᵀ`` on the fused kernels (the dispatcher's Triton entry point).

    The dropout mask is drawn from ``seed``; by default the seed is drawn on the input's device
    (:func:`dropout_seed`: reproducible under ``torch.manual_seed``, no host sync, CUDA-graph safe).
    ``importance``: an ImportanceState whose sensitivity this call's backward emits (paper order).

    Dtypes: x and the base weight share one (fp16, bf16 or fp32); the adapter's parameters may hold
    another (:func:`~adalora_fast.kernels.utils.dot_settings` says how each product is computed). Under
    ``torch.autocast`` x, the weight and the bias are cast to autocast's dtype first, as ``F.linear`` is
    there; the adapter's parameters keep theirs (and so do their gradients).
    """
    compiling = torch.compiler.is_compiling()
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias = _autocast_operands(x, weight, bias)
    if triplet_mask is None:  # (a fresh one while tracing: the cache is a side effect the compiler need not see)
        r = lora_A.shape[0]
        triplet_mask = torch.ones(r, device=lora_A.device, dtype=lora_A.dtype) if compiling else _unmasked(
            r, lora_A.device, lora_A.dtype
        )
    p = dropout_p if training else 0.0
    if compiling and importance is None:  # the torch.library op: traced by torch.compile as one node
        y, _, _ = svd_linear_forward_op(
            x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, float(scaling), fan_in_fan_out, p,
            -1 if seed is None else seed,
        )  # fmt: skip
        return y
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                             for t in (x, lora_A, lora_E, lora_B, weight, bias))):  # fmt: skip
        # Nothing to differentiate (evaluation, no_grad): the launchers alone, without autograd's machinery.
        y, _ = svd_adapter_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_E, lora_B, triplet_mask,
                                   ranknum, float(scaling), fan_in_fan_out, p, dropout_seed(p, x.device, seed))  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[-1])
    # Eagerly, the autograd.Function: the same launchers at about half a custom op's per-call framework
    # overhead (it matters with ~150 adapted layers per step); it also carries the ImportanceState when the
    # backward emits the importance.
    return SVDLinearFunction.apply(
        x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, ranknum, float(scaling), fan_in_fan_out, p,
        dropout_seed(p, x.device, seed), importance,
    )


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_operands(x, weight, bias):
    """x, weight and bias as autocast hands them to ``F.linear``: fp16/bf16/fp32 tensors in its dtype.
    The cast of x is the one copy saved for the backward (the base GEMM's own, under autocast)."""
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype != dtype and t.dtype in _AUTOCAST_ELIGIBLE else t

    return cast(x), cast(weight), cast(bias)


@triton.jit
def _dropout_keep_mask_kernel(OUT_ptr, N, K, SEED_ptr, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(rows, col0, K, SEED_ptr, dropout_p, BLOCK_K).to(tl.float32)
    tl.store(OUT_ptr + rows[:, None] * K + cols[None, :], keep, mask=(rows[:, None] < N) & (cols[None, :] < K))


def svd_adapter_dropout_mask(seed: int | torch.Tensor, n: int, k: int, dropout_p: float, device) -> torch.Tensor:
    """The (n × k) keep mask the kernels draw for ``seed``: lets a reference replay the same dropout."""
    out = torch.empty((n, k), device=device, dtype=torch.float32)
    seed_t = torch.as_tensor(seed, dtype=torch.int64).to(device).reshape(1)
    if n and k:
        _dropout_keep_mask_kernel[(cdiv(n, 32), cdiv(k, 32))](out, n, k, seed_t, dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
