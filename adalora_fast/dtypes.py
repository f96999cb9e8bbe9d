"""The dtype rules the op's paths share, free of Triton (the PyTorch paths use them without it)."""

from __future__ import annotations

import torch

# The activation and adapter-parameter dtypes the kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in for ``x``: autocast's dtype for fp32/fp16/bf16 inputs under
    ``torch.autocast`` on x's device (as ``F.linear`` there), else x's own."""
    if x.dtype in KERNEL_DTYPES and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for compute in ``dtype``: fp64 for fp64 (so gradcheck sees fp64 math end to
    end), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
