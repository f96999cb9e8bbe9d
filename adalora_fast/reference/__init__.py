"""Plain-PyTorch reference of AdaLoRA: the oracle every kernel is tested against.

It reproduces PEFT's ``tuners/adalora`` and the paper's ``loralib`` exactly
(fp32 results are bitwise equal to theirs). No production module imports the reference allocator.
``AdapterTriplet`` and ``BudgetSchedule``, the reference allocator's inputs, are the production ones
(:mod:`adalora_fast.discovery`, :mod:`adalora_fast.schedule`), re-exported here.
"""

from .adapter import (
    apply_dropout_mask,
    rank_scale,
    svd_adapter_add_reference,
    svd_adapter_reference,
    svd_delta_weight_reference,
    svd_linear_reference,
)
from .allocator import (
    AdapterTriplet,
    BudgetSchedule,
    ReferenceRankAllocator,
    element_score,
    masking_threshold,
    sensitivity,
    triplet_score,
    update_importance_ema,
)
from .penalty import orth_penalty_reference, orth_penalty_sum

__all__ = [
    "AdapterTriplet",
    "BudgetSchedule",
    "ReferenceRankAllocator",
    "apply_dropout_mask",
    "element_score",
    "masking_threshold",
    "orth_penalty_reference",
    "orth_penalty_sum",
    "rank_scale",
    "sensitivity",
    "svd_adapter_add_reference",
    "svd_adapter_reference",
    "svd_delta_weight_reference",
    "svd_linear_reference",
    "triplet_score",
    "update_importance_ema",
]
