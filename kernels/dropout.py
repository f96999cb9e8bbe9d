"""In-kernel dropout: the keep mask drawn from a seed, the same in the forward and the backward."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_keep(rows, col0, n_cols, SEED_ptr, p, BLOCK_K: tl.constexpr):
    """The keep mask of dropout at [rows, col0 : col0 + BLOCK_K] (col0 a multiple of 4): the forward and
    the backward draw the same one.

    One Philox call, with counter (c, row), gives four uniforms: the columns 4c .. 4c+3 of that row (a
    quarter of the Philox work, and of the registers that would otherwise spill, of one call per element;
    no counter wraps below 2^32 rows). The seed is read from device memory (one int64) rather than passed
    by value, so that a CUDA graph replays the kernel with each replay's fresh seed instead of the one
    seen at capture.
    """
    groups = (col0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(groups[None, :], (rows.shape[0], BLOCK_K // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (rows.shape[0], BLOCK_K // 4))
    r0, r1, r2, r3 = tl.philox(tl.load(SEED_ptr), c0, c1, c0 * 0, c0 * 0)
    # join(join(r0, r2), join(r1, r3))[..., a, b] is r_(2a+b): row-major, column 4c + j holds r_j
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_K))
    return tl.uint_to_uniform_float(draws) >= p


@triton.jit
def apply_dropout(x, keep, keep_scale):
    """Inverted dropout of a tile with a given keep mask."""
    return tl.where(keep, x * keep_scale, 0.0).to(x.dtype)


@triton.jit
def dropout_tile(x, rows, col0, n_cols, SEED_ptr, p, keep_scale, BLOCK_K: tl.constexpr):
    """Inverted dropout of the tile x = [rows, col0 : col0 + BLOCK_K] with the mask of :func:`dropout_keep`."""
    return apply_dropout(x, dropout_keep(rows, col0, n_cols, SEED_ptr, p, BLOCK_K), keep_scale)
