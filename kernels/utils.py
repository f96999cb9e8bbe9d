"""Helpers shared by the Triton kernel families: tile math, dropout, autotune config lists."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import interpreting


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids. Plain Python: ``triton.cdiv`` costs microseconds per host call in recent
    Triton (a constexpr function), and a layer's forward and backward make about ten of these calls."""
    return -(-a // b)


def rank_pad(r: int) -> int:
    """The rank's register-tile width: a power of two >= 16 (tl.dot needs 16), padding masked."""
    return max(16, 1 << (max(int(r), 1) - 1).bit_length())


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 compute (so gradcheck sees fp64 math end to end), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Whether the kernels in this process were built for the interpreter: Triton decides when a kernel module is
# imported, so this is read once (a per-call environment read costs more than the rest of dot_settings).
_INTERPRETER = interpreting()
_HALF = (torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=None)
def _dot_settings(input_dtype: torch.dtype, param_dtype: torch.dtype, interpreter: bool) -> dict:
    mixed = param_dtype == torch.float32 and input_dtype in _HALF
    return {
        "UPCAST": interpreter and param_dtype == torch.bfloat16,
        "DOT_PRECISION": "tf32" if mixed or param_dtype in _HALF else "ieee",
        "ACC_DTYPE": _TL_DTYPES[accumulate_dtype(param_dtype)],
        "COMPUTE_DTYPE": _TL_DTYPES[param_dtype],
    }


def dot_settings(input_dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> dict:
    """Constexprs every kernel with a tl.dot takes, for activations of ``input_dtype`` and adapter
    parameters of ``param_dtype`` (default: the same).

    COMPUTE_DTYPE: the products run in the parameters' dtype, as PEFT's adapter does (it casts x to the
    adapter's dtype); activation tiles are cast in registers, never copied in memory.
    DOT_PRECISION, chosen per pair:
      * half activations, half parameters: half inputs, fp32 accumulation;
      * half activations, fp32 parameters (PEFT's default: fp32 adapters over a bf16/fp16 model): TF32.
        The half activation is exact in TF32 (bf16's 8 and fp16's 11 significant bits fit in its 11),
        so only the fp32 factor is rounded, to 2^-11 relative: below the 2^-8 / 2^-11 of the half
        values the products are made of, and the tensor cores run instead of fp32 FMAs;
      * fp32 activations and parameters: exact fp32 products ("ieee"), as PyTorch's matmuls by default;
      * fp64: exact.
    UPCAST: the interpreter multiplies bf16 bit patterns in tl.dot, so there bf16 tiles are upcast to
    fp32 first. ACC_DTYPE: the accumulator and intermediate precision.
    """
    return _dot_settings(input_dtype, param_dtype or input_dtype, _INTERPRETER)


def tile_configs(names: tuple[str, ...], rows: list[tuple], interpreter_row: tuple) -> list[triton.Config]:
    """Autotune configs from rows of ``(*tile sizes named by names, num_warps, num_stages)``.

    A curated list on a GPU; under the interpreter only ``interpreter_row`` (nothing to tune there,
    and small tiles keep it fast).
    """

    def config(row):
        return triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1])

    return [config(interpreter_row)] if interpreting() else [config(row) for row in rows]


@triton.jit
def tile_dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


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
