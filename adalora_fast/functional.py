"""Functional API: the SVD-adapted linear op, routed through :mod:`adalora_fast.dispatch`."""

from __future__ import annotations

import torch

from . import dispatch
from .adapter import SVDAdapter, check_input_dtype


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
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` (A, E, B = lora_A, lora_E, lora_B; m = triplet_mask; the rank
    scale s = scaling / (ranknum + RANKNUM_EPS)) on the backend the dispatcher picks.

    ``importance``: an :class:`~adalora_fast.importance.ImportanceState` whose sensitivity this
    call's backward emits (paper order); the kernels do it in their epilogues, given the state's
    tensors (:meth:`~adalora_fast.importance.ImportanceState.emission`), the PyTorch path in gradient
    hooks.

    Dtypes: the output has the input's dtype (autocast's under ``torch.autocast``), the adapter's
    gradients the parameters' dtype, dx the input's; see :func:`~adalora_fast.adapter.check_input_dtype`.
    """
    check_input_dtype(x, weight)
    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, float(scaling), ranknum, fan_in_fan_out,
                         dropout_p if training else 0.0)  # fmt: skip
    return dispatch.svd_adapter_linear(x, weight, bias, adapter, importance)
