"""The fused Triton kernels of AdaLoRA's SVD adapter and their tile configs (the op around them, its entry point,
autograd path, ``torch.library`` ops and launchers, is ``svd_adapter_op``).

    y = x·W0ᵀ + b + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ,     the rank scale s = scaling / (ranknum + RANKNUM_EPS)

A = lora_A (r × in, the right singular vectors), E = lora_E (r × 1, the singular values), m = triplet_mask (r),
B = lora_B (out × r, the left singular vectors). The rank lives in one register tile of R_PAD =
max(16, next_pow2(r)) columns (padding masked), where ``s·E⊙m`` is applied for free. Dropout is drawn inside
the kernels from a seed and regenerated in the backward; the only activations saved are x itself and
H = dropout(x)·Aᵀ (N × R_PAD, fp32).

Forward (the base GEMM + 2 kernels):
  cuBLAS   y = x·W0ᵀ + b                                   (the frozen layer's own GEMM, bias in its epilogue)
  shrink   H = dropout(x)·Aᵀ                               one pass over x
  expand   y += (H·diag(sE⊙m))·Bᵀ                          one read and one write of y (over any other base:
                                                           y = base output + the term, into a fresh y)
Backward (the base dx GEMM + 3 launches, no other device op), with one fp32 workspace in three regions:
Gs (N × R_PAD) at 0, the dA partials (splits × K × R_PAD) at ws_a_offset, the dB partials with dE's as one
extra row per row tile (tiles × (OUT + 1) × R_PAD) at ws_b_offset:
  grad_h   G = dY·B, and per row tile the partial dB = dYᵀ·(H·diag(sE⊙m))   one pass over dY
           epilogue: Gs = G·diag(sE⊙m), partial Σ H⊙G for dE
  cuBLAS   dx = dY·W0
  grad_a_x per token split × input tile: dAᵀ partials = dropout(x)ᵀ·Gs and dx += dropout'(Gs·A) (over any
           other base dx = dropout'(Gs·A), written without a read: autograd adds the base's own dx)
           one pass over x and Gs, one read and one write of dx, one dropout draw for both
  reduce   one grid, three regions, each summing partials in a fixed order (deterministic, no atomics):
           dB = Σ of grad_h's row-tile partials, dA = Σ of grad_a_x's split partials,
           dE = s·m·Σ of grad_h's Σ H⊙G partials (a one-row factor)
The base GEMMs come first and the adapter adds onto their outputs: the same bytes as a GEMM accumulating onto
the adapter's term, and one aten op where that took an allocation and a transposed view besides.
Paper-order importance is emitted by the ``reduce`` epilogues, where dB, dE and dA become final
(``importance_ema``: the EMA tile math).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..adapter import RANKNUM_EPS
from . import interpreting
from .dropout import apply_dropout, dropout_keep, dropout_tile
from .importance_ema import gradient_total, update_importance
from .precision import tile_dot
from .tiles import tile_configs

_RANKNUM_EPS = tl.constexpr(RANKNUM_EPS)  # the references' epsilon, a compile-time constant in the kernels

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rank_scale(mask_ptr, ranknum_ptr, scaling, R, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """m·s = m·scaling/(ranknum + RANKNUM_EPS) as a [R_PAD] vector in the accumulation dtype, zero in the padding."""
    ranks = tl.arange(0, R_PAD)
    keep = tl.load(mask_ptr + ranks, mask=ranks < R, other=0.0).to(ACC_DTYPE)
    return keep * (scaling / (tl.load(ranknum_ptr).to(ACC_DTYPE) + _RANKNUM_EPS))


@triton.jit
def _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD: tl.constexpr,
                               ACC_DTYPE: tl.constexpr):  # fmt: skip
    """s·E⊙m as a [R_PAD] vector in the accumulation dtype, zero in the padding."""
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
    X_ptr, A_ptr, H_ptr, N, K, R, SEED_ptr, dropout_p, keep_scale,
    stride_xm, stride_xk, stride_ar, stride_ak,
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
        a_t = tl.load(A_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        acc = tile_dot(x, a_t, acc, UPCAST, DOT_PRECISION)
    tl.store(H_ptr + rows[:, None] * R_PAD + ranks[None, :], acc, mask=rows[:, None] < N)


@triton.jit
def _svd_adapter_expand_kernel(
    H_ptr, E_ptr, mask_ptr, ranknum_ptr, B_ptr, BASE_ptr, Y_ptr, N, OUT, R, scaling,
    stride_e, stride_bn, stride_br, stride_basem, stride_basen, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    """y = base + (H·diag(sE⊙m))·Bᵀ on one output tile: the base output read once and y written once. The
    fused layer passes its GEMM's y as both (in place); a layer over any other base passes the base's output
    and a fresh y (of PEFT's output dtype), which saves copying it first."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    lam = _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)
    h = tl.load(H_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < N, other=0.0)
    b_t = tl.load(B_ptr + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
                  mask=(cols[None, :] < OUT) & (ranks[:, None] < R), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
    u = (h * lam[None, :]).to(COMPUTE_DTYPE)
    in_bounds = (rows[:, None] < N) & (cols[None, :] < OUT)
    acc = tile_dot(u, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
    base_ptrs = BASE_ptr + rows[:, None] * stride_basem + cols[None, :] * stride_basen
    acc += tl.load(base_ptrs, mask=in_bounds, other=0.0).to(ACC_DTYPE)  # (after the dot: not an MMA operand)
    tl.store(Y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y_ptr.dtype.element_ty),
             mask=in_bounds)  # fmt: skip


@triton.jit
def _svd_adapter_grad_h_kernel(
    DY_ptr, H_ptr, E_ptr, mask_ptr, ranknum_ptr, B_ptr, WS_ptr, ws_b_offset, N, OUT, R, scaling,
    stride_dym, stride_dyn, stride_e, stride_bn, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    """One row tile: Gs = dY·B·diag(sE⊙m) into the workspace's Gs region, and this tile's dB partials
    (OUT rows) with its Σ H⊙G partial for dE as an extra row, into the partials region (see the docstring)."""
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    lam = _effective_singular_values(E_ptr, stride_e, mask_ptr, ranknum_ptr, scaling, R, R_PAD, ACC_DTYPE)
    h = tl.load(H_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < N, other=0.0)
    parts_ptr = WS_ptr + ws_b_offset + tile * (OUT + 1) * R_PAD  # this tile's OUT + 1 rows of partials
    g = tl.zeros((BLOCK_M, R_PAD), dtype=ACC_DTYPE)
    u = (h * lam[None, :]).to(COMPUTE_DTYPE)  # this row tile of H·diag(sE⊙m), for the dB partials
    for n0 in range(0, OUT, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=(rows[:, None] < N) & (cols[None, :] < OUT), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        b = tl.load(B_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(cols[:, None] < OUT) & (ranks[None, :] < R), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
        g = tile_dot(dy, b, g, UPCAST, DOT_PRECISION)
        # This row tile's share of dB = dYᵀ·(H·diag(sE⊙m)), summed over tiles by the reduce kernel.
        part = tile_dot(tl.trans(dy), u, tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
        tl.store(parts_ptr + cols[:, None] * R_PAD + ranks[None, :], part, mask=cols[:, None] < OUT)
    tl.store(WS_ptr + rows[:, None] * R_PAD + ranks[None, :], g * lam[None, :], mask=rows[:, None] < N)
    tl.store(parts_ptr + OUT * R_PAD + ranks, tl.sum(h * g, axis=0))


@triton.jit
def _reduce_factor_tile(
    tile, score_row, WS_ptr, DG_ptr, W_ptr, PREV_ptr, IPT_ptr, UNC_ptr, SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr,
    scaling, ROWS, R, n_parts, part_rows, stride_row, stride_rank, beta1, one_minus_beta1, beta2, one_minus_beta2,
    BLOCK_ROWS: tl.constexpr, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, EMIT: tl.constexpr,
    ACCUMULATE: tl.constexpr, RANK_SCALE: tl.constexpr,
):  # fmt: skip
    """One row tile of a factor's gradient = Σ of n_parts partials (ROWS × R_PAD each, part_rows × R_PAD apart),
    in order: B, A seen as Aᵀ, or E seen as one row (with RANK_SCALE, the sum is multiplied by
    m·scaling/(ranknum + RANKNUM_EPS), i.e. m·s).

    Where the gradient is final, the paper-order epilogue: sensitivity, both EMAs in place, and this
    tile's per-rank sums of the element scores (over B's rows, or A's columns; E's own scores) written
    to row ``score_row`` of SCORE.
    """
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_ROWS, R_PAD), dtype=ACC_DTYPE)
    for t in range(0, n_parts):  # fixed order: bitwise reproducible
        part = WS_ptr + tl.cast(t, tl.int64) * part_rows * R_PAD  # (int64: the partials may pass 2^31 elements)
        acc += tl.load(part + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < ROWS, other=0.0)
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
    WS_ptr, ws_a_offset, ws_b_offset,
    DB_ptr, B_ptr, PREVB_ptr, IPTB_ptr, UNCB_ptr, ROWS_B, parts_b, stride_dbn, stride_dbr,
    DA_ptr, A_ptr, PREVA_ptr, IPTA_ptr, UNCA_ptr, ROWS_A, parts_a, stride_dak, stride_dar,
    DE_ptr, E_ptr, PREVE_ptr, IPTE_ptr, UNCE_ptr, stride_de,
    SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, R, beta1, one_minus_beta1, beta2, one_minus_beta2,
    BLOCK_ROWS: tl.constexpr, R_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, EMIT: tl.constexpr,
    ACCUMULATE_B: tl.constexpr, ACCUMULATE_A: tl.constexpr, ACCUMULATE_E: tl.constexpr,
):  # fmt: skip
    """dB, dA and dE from their partials in one launch: programs [0, B's row tiles) reduce dB, the next
    Aᵀ's row tiles reduce dA, and the last one reduces dE (grad_h's Σ H⊙G partials, one row, scaled)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_b = tl.cdiv(ROWS_B, BLOCK_ROWS)
    tiles_a = tl.cdiv(ROWS_A, BLOCK_ROWS)
    if pid < tiles_b:
        _reduce_factor_tile(pid, pid, WS_ptr + ws_b_offset, DB_ptr, B_ptr, PREVB_ptr, IPTB_ptr, UNCB_ptr, SCORE_ptr,
                            INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, ROWS_B, R, parts_b, ROWS_B + 1,
                            stride_dbn, stride_dbr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_B, False)  # fmt: skip
    elif pid < tiles_b + tiles_a:
        _reduce_factor_tile(pid - tiles_b, pid, WS_ptr + ws_a_offset, DA_ptr, A_ptr, PREVA_ptr, IPTA_ptr, UNCA_ptr,
                            SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, ROWS_A, R, parts_a, ROWS_A,
                            stride_dak, stride_dar, beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_A, False)  # fmt: skip
    else:  # E: one row after each of grad_h's row-tile partials of dB
        _reduce_factor_tile(0, pid, WS_ptr + ws_b_offset + ROWS_B * R_PAD, DE_ptr, E_ptr, PREVE_ptr, IPTE_ptr,
                            UNCE_ptr, SCORE_ptr, INV_SCALE_ptr, mask_ptr, ranknum_ptr, scaling, 1, R, parts_b,
                            ROWS_B + 1, 0, stride_de, beta1, one_minus_beta1, beta2, one_minus_beta2,
                            BLOCK_ROWS, R_PAD, ACC_DTYPE, EMIT, ACCUMULATE_E, True)  # fmt: skip


@triton.jit
def _svd_adapter_grad_a_x_kernel(
    X_ptr, WS_ptr, ws_a_offset, A_ptr, DX_ptr, N, K, R, rows_per_split, SEED_ptr, dropout_p, keep_scale,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_DX: tl.constexpr, DX_ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):  # fmt: skip
    """One token split × input tile: its share of dA = Gsᵀ·dropout(x), stored as dAᵀ partials (split, K,
    R_PAD) in the workspace's dA region, and (HAS_DX) the adapter's dx = dropout'(Gs·A) on the same rows and
    columns: one pass over x and Gs (the workspace's Gs region), one dropout draw for both."""
    col0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    split = tl.program_id(1).to(tl.int64)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=ACC_DTYPE)
    if HAS_DX:
        a = tl.load(A_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0).to(COMPUTE_DTYPE)  # fmt: skip
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = _load_input_tile(X_ptr, rows, col0, end, K, stride_xm, stride_xk, SEED_ptr, dropout_p, keep_scale, False,
                             BLOCK_K, COMPUTE_DTYPE)  # fmt: skip
        if HAS_DROPOUT:
            keep = dropout_keep(rows, col0, K, SEED_ptr, dropout_p, BLOCK_K)
            x = apply_dropout(x, keep, keep_scale)
        gs_t = tl.load(WS_ptr + rows[None, :] * R_PAD + ranks[:, None], mask=rows[None, :] < end, other=0.0)
        acc = tile_dot(gs_t.to(COMPUTE_DTYPE), x, acc, UPCAST, DOT_PRECISION)
        if HAS_DX:
            gs = tl.load(WS_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=rows[:, None] < end, other=0.0)
            du = tile_dot(gs.to(COMPUTE_DTYPE), a, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE), UPCAST, DOT_PRECISION)
            if HAS_DROPOUT:
                du = apply_dropout(du, keep, keep_scale)
            dx_ptrs = DX_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
            in_bounds = (rows[:, None] < end) & (cols[None, :] < K)
            if DX_ACCUMULATE:  # onto the base GEMM's dY·W0 (else dx is the adapter's term alone)
                du += tl.load(dx_ptrs, mask=in_bounds, other=0.0).to(ACC_DTYPE)
            tl.store(dx_ptrs, du.to(DX_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(WS_ptr + ws_a_offset + (split * K + cols[None, :]) * R_PAD + ranks[:, None], acc, mask=cols[None, :] < K)


# The dropout keep mask the kernels draw, as a tensor: lets a reference replay the same dropout (tests).
@triton.jit
def _dropout_keep_mask_kernel(OUT_ptr, N, K, SEED_ptr, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(rows, col0, K, SEED_ptr, dropout_p, BLOCK_K).to(tl.float32)
    tl.store(OUT_ptr + rows[:, None] * K + cols[None, :], keep, mask=(rows[:, None] < N) & (cols[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Tile configurations: a short curated list per kernel, keyed on the shape; one config in the interpreter.
# ---------------------------------------------------------------------------------------------

# Rows are (tile sizes..., num_warps, num_stages); the last argument is the interpreter's single config.
# Every list holds, for every rank pad, at least one config whose registers do not spill on sm_90 and
# sm_80 (the in-kernel dropout's Philox state is what spills first; compile_check reports it).
ROW_TILE_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_K"), [(64, 128, 8, 3), (128, 64, 8, 3), (64, 256, 8, 2), (32, 128, 4, 4)], (16, 32, 4, 1)
)
# expand holds y's tile besides its accumulator: 8 warps for the larger tiles, none over 64 × 128.
OUTPUT_TILE_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_N"), [(64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 8, 4), (32, 64, 4, 4)], (16, 32, 4, 1)
)
GRAD_A_X_CONFIGS = tile_configs(
    ("BLOCK_M", "BLOCK_K"), [(64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 8, 3)], (16, 32, 4, 1)
)
# grad_h's BLOCK_M sets the number of dB partials, and the reduction's BLOCK_ROWS the number of score
# partials (both allocated before the launch), so the launcher fixes those and the rest is tuned.
GRAD_H_BLOCK_M = 16 if interpreting() else 64
GRAD_H_CONFIGS = tile_configs(("BLOCK_N",), [(64, 8, 3), (128, 8, 3), (64, 4, 3), (32, 8, 3)], (32, 4, 1))
REDUCE_BLOCK_ROWS = 32 if interpreting() else 64
REDUCE_CONFIGS = tile_configs((), [(4, 1), (8, 1)], (4, 1))
# grad_a_x splits the tokens so that in × splits fills the GPU; the splits' dA partials are reduced in order.
GRAD_A_MIN_ROWS_PER_SPLIT = 16 if interpreting() else 512

# The autotuned entry points; the raw jit functions above are what the ahead-of-time compile test builds.
svd_adapter_shrink = triton.autotune(ROW_TILE_CONFIGS, key=["K", "R_PAD", "HAS_DROPOUT"])(_svd_adapter_shrink_kernel)
# expand and grad_a_x add onto their output (y, dx) in place: autotuning restores it after each trial.
svd_adapter_expand = triton.autotune(OUTPUT_TILE_CONFIGS, key=["OUT", "R_PAD"], restore_value=["Y_ptr"])(
    _svd_adapter_expand_kernel
)
svd_adapter_grad_h = triton.autotune(GRAD_H_CONFIGS, key=["OUT", "R_PAD"])(_svd_adapter_grad_h_kernel)
# The importance EMAs are updated in place: autotuning restores them after each trial.
_EMA_ARGS = ["IPTB_ptr", "UNCB_ptr", "IPTA_ptr", "UNCA_ptr", "IPTE_ptr", "UNCE_ptr"]
svd_adapter_grad_reduce = triton.autotune(
    REDUCE_CONFIGS, key=["ROWS_B", "ROWS_A", "R_PAD", "EMIT"], restore_value=_EMA_ARGS
)(_svd_adapter_grad_reduce_kernel)
svd_adapter_grad_a_x = triton.autotune(
    GRAD_A_X_CONFIGS, key=["K", "R_PAD", "HAS_DROPOUT", "HAS_DX", "DX_ACCUMULATE"], restore_value=["DX_ptr"]
)(_svd_adapter_grad_a_x_kernel)
