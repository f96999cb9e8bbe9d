"""Reference SVD adapter: ``y = base(x) + s · dropout(x) · (Q ⊙ Λ⊙m)ᵀ · Pᵀ`` in plain PyTorch.

This is the oracle for the fused kernels. It evaluates the product exactly as
PEFT's ``SVDLinear.forward`` and loralib's ``SVDLinear.forward`` do (left to
right, ``* scaling / (ranknum + 1e-5)``), so that in fp32 it is bitwise equal
to both.

Notation (paper → code): Q = ``lora_A`` (r × in), Λ = ``lora_E`` (r × 1),
P = ``lora_B`` (out × r), m = ``triplet_mask`` (r), ``scaling`` = α, and the rank scale
s = α / (r_init + 1e-5) (:func:`rank_scale`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import RANKNUM_EPS  # the references divide by (ranknum + RANKNUM_EPS), ranknum fixed at r_init


def rank_scale(scaling: float, ranknum: torch.Tensor | float) -> float:
    """The rank scale s = scaling / (ranknum + RANKNUM_EPS) (scaling: α; ranknum: r_init) as one Python float."""
    r = float(ranknum) if not isinstance(ranknum, torch.Tensor) else float(ranknum.reshape(-1)[0])
    return float(scaling) / (r + RANKNUM_EPS)


def apply_dropout_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with an explicit keep mask: the same formula ``F.dropout`` applies."""
    if p == 0.0:
        return x
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))


def masked_singular_values(lora_E: torch.Tensor, triplet_mask: torch.Tensor | None) -> torch.Tensor:
    """Λ⊙m as an (r, 1) column; with no mask (or the references' semantics) it is Λ itself."""
    if triplet_mask is None:
        return lora_E
    return lora_E * triplet_mask.reshape(-1, 1).to(lora_E.dtype)


def svd_adapter_reference(
    u: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    triplet_mask: torch.Tensor | None,
    scaling: float,
    ranknum: torch.Tensor,
) -> torch.Tensor:
    """The adapter's contribution for an already dropped-out input ``u`` (any leading dims).

    Evaluated left to right, (u · (A⊙Λm)ᵀ) · Bᵀ, so the dense ΔW is never formed.
    """
    E = masked_singular_values(lora_E, triplet_mask)
    return (u @ (lora_A * E).T @ lora_B.T) * scaling / (ranknum + RANKNUM_EPS)


def svd_linear_reference(
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
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole ``SVDLinear`` forward, as PEFT computes it.

    Dropout: with ``dropout_keep`` given, that keep mask is used (for tests that
    need the same mask on two paths); otherwise ``F.dropout`` draws one from
    torch's RNG, consuming it exactly as ``nn.Dropout`` in PEFT does.
    """
    result = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    u = _dropped_out_input(x, lora_A.dtype, dropout_p, training, dropout_keep)
    # In-place, like PEFT: the output keeps the base layer's dtype.
    result += svd_adapter_reference(u, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum)
    return result


def _dropped_out_input(x, dtype, dropout_p: float, training: bool, dropout_keep) -> torch.Tensor:
    """dropout(x) in the adapter's dtype, as PEFT forms it (x cast first: its _cast_input_dtype)."""
    x = x.to(dtype)
    if dropout_keep is not None:
        return apply_dropout_mask(x, dropout_keep, dropout_p)
    return F.dropout(x, dropout_p, training) if dropout_p > 0.0 else x


def svd_adapter_add_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    triplet_mask: torch.Tensor | None,
    scaling: float,
    ranknum: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adapter's term added onto a base layer's output ``result`` (any base: quantized, a subclass of
    ``nn.Linear``, …), as PEFT's AdaLoRA layers compute it: x cast to the adapter's dtype, the term evaluated
    as :func:`svd_adapter_reference`, the sum in ``out_dtype`` (default: the base output's). Dropout as in
    :func:`svd_linear_reference`."""
    u = _dropped_out_input(x, lora_A.dtype, dropout_p, training, dropout_keep)
    # a copy (the base's backward may need its output), then in place like PEFT: one rounding to out_dtype
    y = result.to(result.dtype if out_dtype is None else out_dtype, copy=True)
    y += svd_adapter_reference(u, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum)
    return y


def svd_delta_weight_reference(
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    triplet_mask: torch.Tensor | None,
    scaling: float,
    ranknum: torch.Tensor,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """ΔW = T(P · (Q ⊙ Λm)) · scaling / (ranknum + 1e-5), the merged delta (PEFT's get_delta_weight)."""
    E = masked_singular_values(lora_E, triplet_mask)
    delta = lora_B @ (lora_A * E)
    if fan_in_fan_out:
        delta = delta.T
    return delta * scaling / (ranknum + RANKNUM_EPS)
