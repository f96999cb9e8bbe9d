"""Paper-order importance: sensitivity scored where the gradient becomes final, from θ_t.

The references (PEFT, loralib) score |w·∇w| after ``optimizer.step()``, from
θ_{t+1}. The paper's Algorithm 1 scores θ_t. An :class:`ImportanceState`
attached to an adapter produces the paper's order: the fused backward emits the
sensitivity, both EMAs and the triplet score in its epilogues; on the PyTorch
path, hooks that run once the gradient is accumulated do the same with the
formulas below. With gradient accumulation only the micro-batch that
completes the optimizer step emits, from the accumulated gradient (|w·Σg|).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

PARAM_NAMES = ("lora_A", "lora_E", "lora_B")


# The importance formulas of the paper (eq. 5-8), one adapter at a time (the flat state computes the same
# over every adapter at once; the oracle adalora_fast.reference.allocator uses these, checked against PEFT).


def sensitivity(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """I = |w · ∇w|, per element."""
    return (param * grad).abs()


def update_importance_ema(
    exp_avg_ipt: torch.Tensor, exp_avg_unc: torch.Tensor, ipt: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ī ← β1·Ī + (1−β1)·I, then Ū ← β2·Ū + (1−β2)·|I − Ī| with the *updated* Ī."""
    exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - exp_avg_ipt).abs()
    return exp_avg_ipt, exp_avg_unc


def element_score(exp_avg_ipt: torch.Tensor, exp_avg_unc: torch.Tensor) -> torch.Tensor:
    """s = Ī · Ū."""
    return exp_avg_ipt * exp_avg_unc


def triplet_score(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), shape (r,)."""
    s_A = torch.mean(score_A, dim=1)  # over in_features
    s_B = torch.mean(score_B, dim=0)  # over out_features
    return score_E.view(-1) + (s_A + s_B)


class ImportanceEmission(NamedTuple):
    """One backward's paper-order emission, as the kernels take it: tensors and numbers, and one call to make
    when the scores are written (the state counts emissions; its allocator checks the count every step)."""

    exp_avg_ipt: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Ī of lora_A, lora_E, lora_B (updated in place)
    exp_avg_unc: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # Ū of the same (updated in place)
    beta1: float
    beta2: float
    grad_scale: float | torch.Tensor | None  # the loss scale the gradients carry (divided out), or None
    triplet_score: torch.Tensor  # (r,): written with E's element scores + the means of A's and B's per rank
    done: Callable[[], None]


class ImportanceState:
    """Sensitivity EMAs of one adapter (Ī, Ū per element of Q, Λ, P) and its triplet scores."""

    def __init__(self, lora_A, lora_E, lora_B, exp_avg_ipt: dict, exp_avg_unc: dict, beta1: float, beta2: float,
                 grad_accumulation_steps: int = 1, triplet_score: torch.Tensor | None = None):  # fmt: skip
        if grad_accumulation_steps < 1:
            raise ValueError(f"grad_accumulation_steps must be >= 1, got {grad_accumulation_steps}")
        self.params = dict(zip(PARAM_NAMES, (lora_A, lora_E, lora_B)))
        self.exp_avg_ipt, self.exp_avg_unc = exp_avg_ipt, exp_avg_unc
        self.beta1, self.beta2 = beta1, beta2
        self.grad_accumulation_steps = grad_accumulation_steps
        if triplet_score is None:
            triplet_score = torch.zeros(lora_A.shape[0], device=lora_A.device, dtype=lora_A.dtype)
        self.triplet_score = triplet_score  # a view into the allocator's flat scores when it owns the state
        self.enabled = True  # the allocator turns emission off for the final phase
        self.grad_scale = None  # the loss scale the gradients carry under AMP (float or device tensor), divided out
        self.emissions = 0  # how many backward passes have emitted (the allocator checks this)
        self._forwards = 0
        self._hooks_pending: set[str] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._gradient_hook(n)) for n, p in self.params.items()]

    # -- which backward emits ------------------------------------------------------------------
    def begin_forward(self) -> bool:
        """Called by a training forward; True when its backward completes an optimizer step."""
        if not self.enabled:
            return False
        self._forwards += 1
        return self._forwards % self.grad_accumulation_steps == 0

    def end_step(self) -> None:
        """The optimizer stepped: the next forward starts a new accumulation window."""
        self._forwards = 0

    @property
    def window_forwards(self) -> int:
        """Training forwards counted so far in this accumulation window (saved with the allocator's state)."""
        return self._forwards

    def restore(self, window_forwards: int, emissions: int) -> None:
        """Resume a saved window; ``emissions`` never goes back below a count the allocator has seen."""
        self._forwards = window_forwards
        self.emissions = max(self.emissions, emissions)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the PyTorch path: hooks, once each gradient is accumulated ---------------------------------
    def arm_gradient_hooks(self) -> None:
        self._hooks_pending = set(PARAM_NAMES)

    def _gradient_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if name not in self._hooks_pending:
                return
            with torch.no_grad():
                ipt = sensitivity(p, self._unscaled(p.grad))
                avg, unc = update_importance_ema(self.exp_avg_ipt[name], self.exp_avg_unc[name], ipt, self.beta1, self.beta2)
                self.exp_avg_ipt[name].copy_(avg)
                self.exp_avg_unc[name].copy_(unc)
            self._hooks_pending.discard(name)
            if not self._hooks_pending:
                self._combine_from_hooks()

        return hook

    @torch.no_grad()
    def _combine_from_hooks(self) -> None:
        scores = [element_score(self.exp_avg_ipt[n], self.exp_avg_unc[n]) for n in PARAM_NAMES]
        self.triplet_score.copy_(triplet_score(*scores))
        self.emissions += 1

    # -- the kernel path: the backward's epilogues do the work, from tensors alone ---------------------------
    def emission(self) -> ImportanceEmission:
        """What a kernel backward needs to emit this adapter's importance (see :class:`ImportanceEmission`)."""
        ipt, unc = self.exp_avg_ipt, self.exp_avg_unc
        return ImportanceEmission(tuple(ipt[n] for n in PARAM_NAMES), tuple(unc[n] for n in PARAM_NAMES), self.beta1,
                                  self.beta2, self.grad_scale, self.triplet_score, self._count_emission)  # fmt: skip

    def _count_emission(self) -> None:
        self.emissions += 1

    def _unscaled(self, g: torch.Tensor) -> torch.Tensor:
        return g if self.grad_scale is None else g / self.grad_scale
