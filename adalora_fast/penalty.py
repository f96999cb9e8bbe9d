"""``compute_orth_regu``: the orthogonality penalty over every adapter of a model (loralib's API)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .discovery import find_orth_matrices
from .reference.penalty import orth_penalty_sum


def compute_orth_regu(
    model: nn.Module, regu_weight: float = 0.1, *, mode: str = "fro", adapter_name: str | None = None
) -> torch.Tensor:
    """``regu_weight · mean_k ‖G_k − I‖`` over all lora_A (QQᵀ) and lora_B (PᵀP) matrices.

    ``mode="fro"`` is the references' un-squared Frobenius norm; ``"fro2"`` the
    paper's squared form. Computed as loralib does (``w · Σ / n``); PEFT's
    ``AdaLoraModel.forward`` computes ``w · (Σ / n)``, which can differ in the last bit.
    """
    if regu_weight < 0:
        raise ValueError(f"regu_weight must be >= 0, got {regu_weight}")
    mats = find_orth_matrices(model, adapter_name)
    if not mats:
        raise ValueError("compute_orth_regu: the model has no AdaLoRA adapters (no lora_A / lora_B parameters)")
    total = orth_penalty_sum([(p, is_right) for _, p, is_right in mats], mode)
    return regu_weight * total / len(mats)
