"""Reference orthogonality penalty R(P, Q) over a list of adapters.

PEFT (``AdaLoraModel.forward``) and loralib (``compute_orth_regu``) compute, for
every ``lora_A`` (Q, r × in) and every ``lora_B`` (P, out × r),
``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F`` over the full r_init rows/columns (pruned
triplets included), then average over all 2·M matrices. The norm is *not*
squared (mode ``"fro"``, the default). The paper writes the squared norm; mode
``"fro2"`` gives ``‖·‖²_F`` averaged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PENALTY_MODES = ("fro", "fro2")


def check_penalty_mode(mode: str) -> None:
    if mode not in PENALTY_MODES:
        raise ValueError(f"orthogonality penalty mode must be one of {PENALTY_MODES}, got {mode!r}")


def gram_deviation(p: torch.Tensor, is_right: bool) -> torch.Tensor:
    """QQᵀ − I for a right factor (lora_A), PᵀP − I for a left factor (lora_B)."""
    cov = p @ p.T if is_right else p.T @ p
    eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
    return cov - eye


def orth_penalty_reference(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], mode: str = "fro"
) -> torch.Tensor:
    """Mean over all A and B matrices of ‖G − I‖_F (``fro``) or ‖G − I‖²_F (``fro2``)."""
    mats = [(p, True) for p in lora_As] + [(p, False) for p in lora_Bs]
    return orth_penalty_sum(mats, mode) / len(mats)


def orth_penalty_sum(mats: Sequence[tuple[torch.Tensor, bool]], mode: str = "fro") -> torch.Tensor:
    """Σ ‖G − I‖ over ``(matrix, is_right_factor)`` pairs, accumulated in the order given.

    PEFT and loralib visit the matrices in ``named_parameters()`` order and keep
    a running sum; callers pass that order to get the same rounding.
    """
    check_penalty_mode(mode)
    if not mats:
        raise ValueError("orthogonality penalty: no lora_A / lora_B matrices were given")
    total = 0
    for p, is_right in mats:
        dev = gram_deviation(p, is_right)
        # fro2 sums squares directly: no sqrt to undo, and a smooth gradient at G = I.
        total = total + ((dev * dev).sum() if mode == "fro2" else torch.norm(dev, p="fro"))
    return total
