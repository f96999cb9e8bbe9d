"""Finding AdaLoRA adapters in a model the way the references do: by parameter name.

loralib matches the substrings ``lora_A`` / ``lora_E`` / ``lora_B``; PEFT also
requires the adapter name (its parameters are ``…lora_A.<adapter>``). Keeping
this matching means a model built with ``FastSVDLinear``, loralib's
``SVDLinear`` or PEFT's ``SVDLinear`` is found the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class AdapterTriplet:
    """The three trainable tensors of one adapted module, under their parameter names."""

    name_A: str
    name_E: str
    name_B: str
    lora_A: torch.Tensor
    lora_E: torch.Tensor
    lora_B: torch.Tensor

    @property
    def rank(self) -> int:
        return full_shape(self.lora_A)[0]

    @property
    def in_features(self) -> int:
        return full_shape(self.lora_A)[1]

    @property
    def out_features(self) -> int:
        return full_shape(self.lora_B)[0]

    def named(self):
        return ((self.name_A, self.lora_A), (self.name_E, self.lora_E), (self.name_B, self.lora_B))


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape as the model sees it, also while ZeRO-3 holds only this rank's partition."""
    return getattr(p, "ds_shape", None) or p.shape


def require_grad(name: str, p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, or a clear error naming the parameter when the allocator runs without one."""
    if p.grad is None:
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # (DeepSpeed ZeRO took the parameter over later)
            raise RuntimeError(
                f"rank allocator: {name} has no gradient: DeepSpeed ZeRO keeps it in its own buffers, and this "
                "allocator was made before deepspeed.initialize. Make it after deepspeed.initialize, before the "
                "first step (a patched PEFT model makes its own at its first training forward)."
            )
        raise RuntimeError(
            f"rank allocator: {name} has no gradient. Call it after backward() and before zero_grad(), "
            "on parameters with requires_grad=True."
        )
    return p.grad


def _selected(name: str, kind: str, adapter_name: str | None) -> bool:
    if adapter_name is None:
        return kind in name
    return f"{kind}.{adapter_name}" in name


def find_adapter_triplets(model: nn.Module, adapter_name: str | None = None) -> list[AdapterTriplet]:
    """All (lora_A, lora_E, lora_B) triplets, in ``named_parameters()`` order."""
    params = dict(model.named_parameters())
    triplets = []
    for name, p in params.items():
        if not _selected(name, "lora_A", adapter_name):
            continue
        name_E, name_B = name.replace("lora_A", "lora_E"), name.replace("lora_A", "lora_B")
        missing = [n for n in (name_E, name_B) if n not in params]
        if missing:
            raise ValueError(f"adapter {name!r} has no matching {missing}: not an AdaLoRA (SVD) adapter")
        triplets.append(AdapterTriplet(name, name_E, name_B, p, params[name_E], params[name_B]))
    return triplets


def find_orth_matrices(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, object, bool]]:
    """(name, parameter, is_right_factor) for every lora_A (Q) and lora_B (P), in ``named_parameters()`` order."""
    mats = []
    for name, p in model.named_parameters():
        if _selected(name, "lora_A", adapter_name):
            mats.append((name, p, True))
        elif _selected(name, "lora_B", adapter_name):
            mats.append((name, p, False))
    return mats
