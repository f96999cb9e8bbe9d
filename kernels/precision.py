"""How the kernels' products are computed: the dot constexprs per dtype pair, and the tile product itself."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dtypes import accumulate_dtype
from . import interpreting

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
    fp32 first. ACC_DTYPE: the accumulator and intermediate precision
    (:func:`~adalora_fast.dtypes.accumulate_dtype`).
    """
    return _dot_settings(input_dtype, param_dtype or input_dtype, _INTERPRETER)


@triton.jit
def tile_dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
