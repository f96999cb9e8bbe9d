"""The orthogonality penalty: the compiled multi-factor op, its autograd, and ``compute_orth_regu``.

``torch.ops.adalora_fast.orth_penalty_forward/backward`` (csrc/) compute the
penalty of every adapter in a constant number of launches. This module gives
them a fake (meta) implementation, so ``torch.compile`` traces them without a
graph break, and an autograd formula; :func:`orth_penalty` is the launcher
that :mod:`adalora_fast.dispatch` routes to the op or to the PyTorch reference
(:mod:`adalora_fast.reference.penalty`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from . import dispatch
from .discovery import find_orth_matrices
from .dtypes import accumulate_dtype
from .extension import load_extension
from .flat_state import is_sharded
from .reference.penalty import check_penalty_mode, orth_penalty_sum


def _register_op_python_parts() -> bool:
    """Fake implementations and autograd for the C++ ops; False when the extension is not loaded."""
    if load_extension()[0] is None:
        return False

    @torch.library.register_fake("adalora_fast::orth_penalty_forward")
    def _forward_fake(factors, is_right, mode):
        ranks = [f.shape[0] if right else f.shape[1] for f, right in zip(factors, is_right)]
        acc = accumulate_dtype(factors[0].dtype)
        dev = factors[0].new_empty((sum(r * r for r in ranks),), dtype=acc)
        return factors[0].new_empty((), dtype=factors[0].dtype), dev, factors[0].new_empty((len(factors),), dtype=acc)

    @torch.library.register_fake("adalora_fast::orth_penalty_backward")
    def _backward_fake(grad_loss, factors, is_right, deviation, sq_norms, mode):
        return [torch.empty_like(f) for f in factors]

    def _setup_context(ctx, inputs, output):
        factors, is_right, mode = inputs
        _, deviation, sq_norms = output
        ctx.mark_non_differentiable(deviation, sq_norms)
        _save_for_backward(ctx, factors, is_right, mode, deviation, sq_norms)

    def _backward(ctx, grad_loss, _grad_deviation, _grad_sq_norms):
        return _factor_grads(ctx, grad_loss), None, None

    torch.library.register_autograd(
        "adalora_fast::orth_penalty_forward", _backward, setup_context=_setup_context
    )
    return True


def _save_for_backward(ctx, factors, is_right, mode, deviation, sq_norms) -> None:
    ctx.save_for_backward(deviation, sq_norms, *factors)
    ctx.is_right, ctx.mode = is_right, mode


def _factor_grads(ctx, grad_loss) -> list[torch.Tensor]:
    deviation, sq_norms, *factors = ctx.saved_tensors
    return list(torch.ops.adalora_fast.orth_penalty_backward(grad_loss, factors, ctx.is_right, deviation, sq_norms,
                                                             ctx.mode))  # fmt: skip


_OP_REGISTERED = _register_op_python_parts()


def _eager_entry():
    """Eager calls' entry point: the forward op and its backward as one C++ autograd node
    (csrc/orth_penalty_autograd.cpp), the OpOverload's own callable (its Python frame costs a call).
    torch.compile traces orth_penalty_forward and the autograd registered above instead."""
    if not _OP_REGISTERED:
        return None
    ops = torch.ops.adalora_fast
    if not hasattr(ops, "orth_penalty"):  # (an extension built before the node: the registered autograd)
        return lambda factors, is_right, mode: ops.orth_penalty_forward(factors, is_right, mode)[0]
    return getattr(ops.orth_penalty.default, "_op", ops.orth_penalty.default)


_eager_penalty = _eager_entry()


def _groups_by_device_and_dtype(factors: Sequence[torch.Tensor], is_right: Sequence[bool]) -> list[tuple[list, list]]:
    """(factors, is_right flags as 0/1) per (device, dtype), in order of first appearance. The common case, one
    device and dtype, is checked without a device object per factor (each costs a tenth of a microsecond, and
    a model has hundreds of factors)."""
    first = factors[0]
    dtype = first.dtype
    if first.is_cuda:
        index = first.get_device()
        same = all(f.dtype is dtype and f.is_cuda and f.get_device() == index for f in factors)
    elif first.is_cpu:
        same = all(f.dtype is dtype and f.is_cpu for f in factors)
    else:
        device = first.device
        same = all(f.dtype is dtype and f.device == device for f in factors)
    if same:
        return [(list(factors), [1 if r else 0 for r in is_right])]
    groups: dict[tuple, tuple[list, list]] = {}
    for f, right in zip(factors, is_right):
        fs, rights = groups.setdefault((f.device, f.dtype), ([], []))
        fs.append(f)
        rights.append(1 if right else 0)
    return list(groups.values())


def orth_penalty(
    factors: Sequence[torch.Tensor], is_right: Sequence[bool], mode: str = "fro", backend: str | None = None
) -> torch.Tensor:
    """Mean over the factors of ‖G − I‖_F (``fro``) or ‖G − I‖²_F (``fro2``), G = QQᵀ or PᵀP.

    ``is_right[k]`` is True for a lora_A (Q, r × in) and False for a lora_B
    (P, out × r). Factors of several dtypes or devices are grouped, one op call per group.
    ``backend``: None (the dispatcher chooses), ``"extension"`` or ``"reference"``.
    """
    check_penalty_mode(mode)
    if not factors:
        raise ValueError("orthogonality penalty: no lora_A / lora_B matrices were given")
    if len(factors) != len(is_right):
        raise ValueError(f"{len(factors)} factors but {len(is_right)} is_right flags")
    # Sharded factors (FSDP2 DTensors, partitioned ZeRO-3 parameters) are gathered, differentiably: every
    # rank computes the whole penalty.
    # (plain parameters and tensors, the common case, skip the per-factor check: a DTensor is neither)
    if not all(type(f) is nn.Parameter or type(f) is torch.Tensor for f in factors):
        factors = [f.full_tensor() if is_sharded(f) else f for f in factors]
    if hasattr(factors[0], "ds_id"):
        from .integrations.deepspeed import gather_partitioned, is_partitioned_now

        if any(is_partitioned_now(f) for f in factors):
            factors = gather_partitioned(factors)
    groups = _groups_by_device_and_dtype(factors, is_right)
    total = None
    for fs, rights in groups:
        if dispatch.penalty_backend(fs[0], backend) == "extension":
            if torch.compiler.is_compiling():
                loss = torch.ops.adalora_fast.orth_penalty_forward(fs, rights, mode)[0]
            else:
                loss = _eager_penalty(fs, rights, mode)
            if len(groups) == 1:
                return loss  # (the op's mean over all factors: no sum to rescale)
            part = loss * len(fs)
        else:
            part = orth_penalty_sum(list(zip(fs, rights)), mode)
        total = part if total is None else total + part
    return total / len(factors)


def compute_orth_regu(
    model: nn.Module, regu_weight: float = 0.1, *, mode: str = "fro", adapter_name: str | None = None
) -> torch.Tensor:
    """``regu_weight · mean_k ‖G_k − I‖`` over all lora_A (QQᵀ) and lora_B (PᵀP) matrices of ``model``.

    ``mode="fro"`` is the references' un-squared Frobenius norm; ``"fro2"`` the
    paper's squared form. Adapters are found by parameter name, as loralib
    (``lora_A`` / ``lora_B``) and PEFT (``…lora_A.<adapter_name>``) name them.
    """
    if regu_weight < 0:
        raise ValueError(f"regu_weight must be >= 0, got {regu_weight}")
    mats = find_orth_matrices(model, adapter_name)
    if not mats:
        raise ValueError("compute_orth_regu: the model has no AdaLoRA adapters (no lora_A / lora_B parameters)")
    return regu_weight * orth_penalty([p for _, p, _ in mats], [right for _, _, right in mats], mode)
