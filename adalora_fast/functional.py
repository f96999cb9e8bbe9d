"""Functional API: the SVD-adapted linear op, routed through :mod:`adalora_fast.dispatch`."""

from __future__ import annotations

import torch

from . import dispatch
from .adapter import SVDAdapter
from .reference.adapter import svd_linear_reference


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
    if x.dtype == weight.dtype or (x.dtype in dispatch.KERNEL_DTYPES and torch.is_autocast_enabled(x.device.type)):
        return
    raise TypeError(
        f"the layer's base weight is {weight.dtype} but its input is {x.dtype}: cast the input "
        f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype})), or run it under torch.autocast"
    )


def svd_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    triplet_mask: torch.Tensor | None,
    scaling: float,
    ranknum: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    dropout_p: float = 0.0,
    training: bool = False,
    importance=None,
) -> torch.Tensor:
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` (A, E, B = lora_A, lora_E, lora_B; m = triplet_mask) on the
    backend the dispatcher picks.

    ``importance``: an :class:`~adalora_fast.importance.ImportanceState` whose sensitivity this
    call's backward emits (paper order); the kernels do it in their epilogues, given the state's
    tensors (:meth:`~adalora_fast.importance.ImportanceState.emission`), the PyTorch path in gradient
    hooks.

    Dtypes: the output has the input's dtype (autocast's under ``torch.autocast``), the adapter's
    gradients the parameters' dtype, dx the input's; see :func:`check_input_dtype`.
    """
    check_input_dtype(x, weight)
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, ranknum, float(scaling), fan_in_fan_out,
                         dropout_p if training else 0.0)  # fmt: skip
    return svd_adapter_linear(x, weight, bias, adapter, importance)


def svd_adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter,
                       importance=None) -> torch.Tensor:  # fmt: skip
    """:func:`svd_linear` for an :class:`~adalora_fast.adapter.SVDAdapter` (dtypes already checked): the one
    place where the op chooses its backend."""
    if dispatch.adapter_backend(x, adapter.lora_A, adapter.lora_E, adapter.lora_B) == "triton":
        emission = importance.emission() if importance is not None else None
        return dispatch.svd_linear_triton(x, weight, bias, adapter, importance=emission)
    if importance is not None:
        importance.arm_gradient_hooks()
    lora_A, lora_E, lora_B, mask, ranknum, scaling, fan_in_fan_out, dropout_p = adapter
    return svd_linear_reference(
        x, weight, bias, lora_A, lora_E, lora_B, mask, scaling, ranknum,
        fan_in_fan_out=fan_in_fan_out, dropout_p=dropout_p, training=dropout_p > 0,
    )  # fmt: skip
