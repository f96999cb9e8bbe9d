"""``FastSVDLinear``: a drop-in for loralib's ``SVDLinear`` (AdaLoRA's adapted linear layer).

Same constructor, parameter names and shapes (``weight``, ``bias``, ``lora_A``,
``lora_E``, ``lora_B``, ``ranknum``), same initialisation and the same
``train()`` / ``eval()`` merge behaviour, so swapping the import is the whole
migration and state dicts load both ways. The forward runs on the fused
kernels or the PyTorch reference, as :mod:`adalora_fast.dispatch` decides.

``triplet_mask`` (r,) is the mask the kernels consume as ``diag(Λ⊙mask)``. It
is a non-persistent buffer of ones: under the references' semantics the rank
allocator prunes by zeroing λ in place (a pruned λ may regrow through its
gradient until the next masking event), and the mask stays at one. Setting an
entry to zero removes that triplet from the forward and from every gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch
from .adapter import SVDAdapter, check_input_dtype, check_svd_linear_input
from .reference.adapter import svd_delta_weight_reference


class FastSVDLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        if not isinstance(r, int) or r < 1:
            raise ValueError(
                f"FastSVDLinear needs an initial rank r >= 1, got r={r!r} (r=0 means no adapter: use nn.Linear)"
            )
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.fan_in_fan_out = fan_in_fan_out

        self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))  # Q, right singular vectors
        self.lora_E = nn.Parameter(self.weight.new_zeros(r, 1))  # Λ, singular values
        self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))  # P, left singular vectors
        self.ranknum = nn.Parameter(self.weight.new_zeros(1), requires_grad=False)
        self.ranknum.data.fill_(float(r))
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        self.weight.requires_grad = False
        self.register_buffer("triplet_mask", self.weight.new_ones(r), persistent=False)
        self.importance = None  # an ImportanceState when a paper-order RankAllocator is attached
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.T

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, **kwargs) -> FastSVDLinear:
        """An adapted copy of ``linear`` that shares its frozen weight and bias."""
        layer = cls(
            linear.in_features, linear.out_features, r=r, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype, **kwargs,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(linear.weight.T if layer.fan_in_fan_out else linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def dropout_p(self) -> float:
        dropout = self._modules["lora_dropout"]  # (a submodule attribute is a Python __getattr__ call per read)
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the stored weight's layout."""
        return svd_delta_weight_reference(
            self.lora_A, self.lora_E, self.lora_B, self.triplet_mask, self.scaling, self.ranknum,
            self.fan_in_fan_out,
        )  # fmt: skip

    def train(self, mode: bool = True):
        """Unmerge for training, merge for evaluation (when ``merge_weights``).

        loralib merges only when ``eval()`` is called on the layer itself; here
        ``parent.eval()`` (which calls ``train(False)``) merges too. The outputs
        are the same either way.
        """
        nn.Linear.train(self, mode)
        if mode and self.merged:
            with torch.no_grad():
                self.weight.data -= self.delta_weight()
            self.merged = False
        elif not mode and self.merge_weights and not self.merged:
            with torch.no_grad():
                self.weight.data += self.delta_weight()
            self.merged = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # (read once: nn.Module's attribute lookup is a Python call per name)
        weight = params["weight"]
        check_svd_linear_input(x, weight, self.in_features)
        check_input_dtype(x, weight)
        if self.merged:
            return F.linear(x, weight.T if self.fan_in_fan_out else weight, params["bias"])
        emit = self.importance if self._emits_importance() else None
        adapter = SVDAdapter(params["lora_A"], params["lora_E"], params["lora_B"], self._buffers["triplet_mask"],
                             float(self.scaling), params["ranknum"], self.fan_in_fan_out,
                             self.dropout_p if self.training else 0.0)  # fmt: skip
        return dispatch.svd_adapter_linear(x, weight, params["bias"], adapter, emit)

    def attach_importance(self, state) -> None:
        """Emit paper-order importance into ``state`` (an :class:`~adalora_fast.importance.ImportanceState`)
        from every step-completing backward; replaces (and unhooks) any state attached before."""
        self.detach_importance()
        self.importance = state

    def detach_importance(self) -> None:
        """Stop emitting importance (removes the attached state's gradient hooks)."""
        if self.importance is not None:
            self.importance.remove()
        self.importance = None

    def _emits_importance(self) -> bool:
        """Whether this forward's backward scores the sensitivity (paper order, step-completing micro-batch)."""
        return (
            self.importance is not None
            and self.training
            and torch.is_grad_enabled()
            and self.importance.begin_forward()
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, dropout={self.dropout_p}"


def convert_linear_layers(
    model: nn.Module,
    r: int,
    lora_alpha: int = 1,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    merge_weights: bool = True,
) -> list[str]:
    """Replace ``nn.Linear`` submodules (all, or those whose name ends with one of
    ``target_modules``) with ``FastSVDLinear`` in place; returns the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if target_modules is not None and not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            FastSVDLinear.from_linear(
                module, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights
            ),
        )
        replaced.append(name)
    if not replaced:
        raise ValueError("convert_linear_layers: no nn.Linear layer matched")
    return replaced


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """loralib's helper: train only ``lora_*`` parameters (and biases, with ``bias='all'`` or ``'lora_only'``)."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, FastSVDLinear) and m.bias is not None:
                m.bias.requires_grad = True
