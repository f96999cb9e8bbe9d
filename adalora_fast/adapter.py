"""``SVDAdapter``: one layer's SVD adapter P·diag(Λ⊙m)·Q as the op takes it, one value through every layer of
the op (functional API, dispatch, kernels' launchers, autograd) instead of a dozen positional arguments.

Names: the user-facing PEFT/loralib names throughout the code, the paper's letters in the math.

==============  ======  ==============================================
field           paper   shape / meaning
==============  ======  ==============================================
``lora_A``      Q       (r, in): the right singular vectors
``lora_E``      Λ       (r, 1): the singular values
``lora_B``      P       (out, r): the left singular vectors
``triplet_mask`` m      (r,) or None (all ones): 0 removes a triplet
``ranknum``             (1,): r_init, the references' rank divisor
``scaling``             float: α (loralib: α, or r when α = 0)
==============  ======  ==============================================

The adapter's term is ``dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ · scaling / (ranknum + RANKNUM_EPS)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The references divide by (ranknum + RANKNUM_EPS), with ranknum fixed at r_init.
RANKNUM_EPS = 1e-5


class SVDAdapter(NamedTuple):
    """The adapter's tensors and scalars for one call. ``dropout_p`` is the dropout this call applies (0 outside
    training); ``fan_in_fan_out``: the base weight is stored (in, out), as in GPT-2's Conv1D."""

    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor
    triplet_mask: torch.Tensor | None
    ranknum: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    dropout_p: float = 0.0

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lora_A, lora_E, lora_B): the trainable tensors."""
        return self.lora_A, self.lora_E, self.lora_B

