"""``SVDAdapter``: one layer's SVD adapter P·diag(Λ⊙m)·Q as the op takes it, one value through every layer of
the op (functional API, dispatch, the kernels' op module) instead of a dozen positional arguments; and the rules
the op's inputs follow (:func:`check_svd_linear_input`, :func:`check_input_dtype`).

Names: the user-facing PEFT/loralib names throughout the code, the paper's letters in the math.

==================  ======  ==============================================
field               paper   shape / meaning
==================  ======  ==============================================
``lora_A``          Q       (r, in): the right singular vectors
``lora_E``          Λ       (r, 1): the singular values
``lora_B``          P       (out, r): the left singular vectors
``triplet_mask``    m       (r,) or None (all ones): 0 removes a triplet
``scaling``         α       float: loralib's α (or r when α = 0), PEFT's ``scaling``
``ranknum``                 (1,): r_init, the references' rank divisor
==================  ======  ==============================================

The adapter's term is ``s · dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` with the rank scale
``s = scaling / (ranknum + RANKNUM_EPS)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dtypes import KERNEL_DTYPES

# The references divide by (ranknum + RANKNUM_EPS), with ranknum fixed at r_init.
RANKNUM_EPS = 1e-5


class SVDAdapter(NamedTuple):
    """The adapter's tensors and scalars for one call, in the order of the functional API and the references
    (``…, triplet_mask, scaling, ranknum``). ``dropout_p`` is the dropout this call applies (0 outside
    training); ``fan_in_fan_out``: the base weight is stored (in, out), as in GPT-2's Conv1D."""

    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor
    triplet_mask: torch.Tensor | None
    scaling: float
    ranknum: torch.Tensor
    fan_in_fan_out: bool = False
    dropout_p: float = 0.0

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lora_A, lora_E, lora_B): the trainable tensors."""
        return self.lora_A, self.lora_E, self.lora_B


def check_svd_linear_input(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> None:
    """Clear errors for inputs the layer cannot take (instead of an opaque matmul failure)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"FastSVDLinear needs a floating-point input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"FastSVDLinear expects inputs whose last dimension is in_features={in_features}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"the input is on {x.device} but the layer's weights are on {weight.device}")


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The dtype rule of the adapted layer, as ``F.linear``'s: the input has the base weight's dtype, or
    autocast casts both (fp16/bf16/fp32 inputs under ``torch.autocast`` on the input's device). The adapter's
    parameters may hold another dtype (e.g. PEFT's fp32 adapters over a bf16 model)."""
    if x.dtype == weight.dtype or (x.dtype in KERNEL_DTYPES and torch.is_autocast_enabled(x.device.type)):
        return
    raise TypeError(
        f"the layer's base weight is {weight.dtype} but its input is {x.dtype}: cast the input "
        f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype})), or run it under torch.autocast"
    )


def check_adapter_add_input(result: torch.Tensor, x: torch.Tensor, adapter: SVDAdapter) -> None:
    """Clear errors for a base layer's output and input that the adapter cannot be added onto."""
    if not (x.is_floating_point() and result.is_floating_point()):
        raise TypeError(f"the adapter needs floating-point tensors, got x {x.dtype} and the base output {result.dtype}")
    in_features, out_features = adapter.lora_A.shape[1], adapter.lora_B.shape[0]
    # (ints only: comparing torch.Size objects goes through symbolic-shape helpers, a Python call per element)
    if x.dim() == 0 or x.shape[-1] != in_features or result.dim() == 0 or result.shape[-1] != out_features or (
        result.numel() * in_features != x.numel() * out_features
    ):
        raise ValueError(
            f"the base layer's output {tuple(result.shape)} does not match the adapter on x {tuple(x.shape)}: "
            f"the adapter takes {in_features} input features and gives {out_features} per row, one row per row of x"
        )
    if x.device != result.device or x.device != adapter.lora_A.device:
        raise ValueError(f"x is on {x.device}, the base output on {result.device}, the adapter on {adapter.lora_A.device}")
