"""Reference rank allocator: sensitivity, EMAs, triplet scores, cubic budget, global threshold.

Plain PyTorch, one layer at a time, written to reproduce PEFT's
``tuners/adalora`` ``RankAllocator`` and loralib's ``RankAllocator`` step for
step (bitwise in fp32). Two documented differences between those two are
selected by ``semantics``:

* ``"peft"``: at ``step == T − tfinal`` the mask is forced to the target budget;
  after it the stored keep pattern is re-applied every step.
* ``"loralib"``: ``step == T − tfinal`` is the last step of the cubic branch
  (masking only when ``step % deltaT == 0``); after it every step rescores from
  the frozen EMAs and masks again (the same pattern, since the EMAs no longer move).

Known reference bugs are not copied: a final phase reached without any earlier
mask computes one from the scores (PEFT crashes), rank_pattern is always
available (loralib fills it only with a TensorBoard writer), and invalid
schedules or a missing gradient raise a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEMANTICS = ("peft", "loralib")
ORDERS = ("reference", "paper")


# ---------------------------------------------------------------------------
# Element-wise importance (paper eq. 5-8)
# ---------------------------------------------------------------------------


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


def masking_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest triplet score; every score ``<=`` it is pruned (ties included)."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"cannot prune {k} of {scores.numel()} triplets")
    return torch.kthvalue(scores, k).values


# ---------------------------------------------------------------------------
# Budget schedule (paper eq. 12)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSchedule:
    """The cubic budget b(t) with its exact phase boundaries.

    ``init_bgt`` = Σ r_init over adapters, ``target_bgt`` = target_r × #adapters
    (or a total given directly). Phases: ``step <= tinit`` warm-up (no mask);
    ``step > total_step − tfinal`` final (budget = target, mask every step);
    otherwise ``int((b0 − bT)·(1 − (t − ti)/(T − tf − ti))³ + bT)``, masking
    when ``step % deltaT == 0``.
    """

    init_bgt: int
    target_bgt: int
    tinit: int
    tfinal: int
    total_step: int
    deltaT: int

    def __post_init__(self):
        if self.total_step is None:
            raise ValueError("total_step is not set: pass total_step or call set_total_step() before training")
        if self.target_bgt >= self.init_bgt:
            raise ValueError(
                f"the target budget ({self.target_bgt} triplets) must be smaller than the initial budget "
                f"({self.init_bgt}): target_r must be < init_r"
            )
        if self.target_bgt < 0:
            raise ValueError(f"the target budget must be >= 0, got {self.target_bgt}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"tinit and tfinal must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}")
        if self.total_step <= self.tinit + self.tfinal:
            raise ValueError(
                f"total_step ({self.total_step}) must be > tinit + tfinal ({self.tinit} + {self.tfinal}): "
                "the schedule has no budgeting phase"
            )
        if self.deltaT < 1:
            raise ValueError(f"deltaT (mask_interval) must be >= 1, got {self.deltaT}")

    @property
    def final_start(self) -> int:
        """T − tfinal: the step that fixes the final pattern."""
        return self.total_step - self.tfinal

    def __call__(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?) for a 0-based optimizer step, as the references compute it."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.final_start:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.deltaT == 0


def check_betas(beta1: float, beta2: float) -> None:
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 < b < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {b}")


# ---------------------------------------------------------------------------
# The allocator, one adapter at a time
# ---------------------------------------------------------------------------


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
        return self.lora_A.shape[0]

    def named(self):
        return ((self.name_A, self.lora_A), (self.name_E, self.lora_E), (self.name_B, self.lora_B))


def require_grad(name: str, p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError(
            f"rank allocator: {name} has no gradient. Call it after backward() and before zero_grad(), "
            "on parameters with requires_grad=True."
        )
    return p.grad


class ReferenceRankAllocator:
    """AdaLoRA's allocator over explicit adapters, in the references' per-layer style.

    ``step(global_step)`` is one call of PEFT's ``update_and_allocate`` (semantics
    ``"peft"``) or loralib's ``update_and_mask`` (``"loralib"``), made after
    ``optimizer.step()`` and before ``zero_grad()``.
    """

    def __init__(
        self,
        triplets: list[AdapterTriplet],
        schedule: BudgetSchedule,
        beta1: float,
        beta2: float,
        semantics: str = "peft",
        order: str = "reference",
    ):
        if not triplets:
            raise ValueError("rank allocator: no AdaLoRA adapters (lora_A / lora_E / lora_B) were found")
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        check_betas(beta1, beta2)
        self.triplets = triplets
        self.schedule = schedule
        self.beta1, self.beta2 = beta1, beta2
        self.semantics = semantics
        # "reference": step() scores θ after the optimizer step, as PEFT and loralib do. "paper": the
        # scores were updated from θ_t before the step (update_ipt() called then, or emitted by the
        # backward into importance_states) and step() only masks.
        self.order = order
        self.importance_states: list | None = None  # per triplet, when the backward emits the scores
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.keep: dict[str, torch.Tensor] | None = None  # name_E -> bool (r,), the last decision

    # -- importance ---------------------------------------------------------
    @torch.no_grad()
    def update_ipt(self) -> None:
        for t in self.triplets:
            for name, p in t.named():
                ipt = sensitivity(p, require_grad(name, p))
                if name not in self.exp_avg_ipt:
                    self.exp_avg_ipt[name] = torch.zeros_like(p)
                    self.exp_avg_unc[name] = torch.zeros_like(p)
                self.exp_avg_ipt[name], self.exp_avg_unc[name] = update_importance_ema(
                    self.exp_avg_ipt[name], self.exp_avg_unc[name], ipt, self.beta1, self.beta2
                )

    def triplet_scores(self) -> list[torch.Tensor]:
        if self.importance_states is not None:
            return [state.triplet_score for state in self.importance_states]
        if not self.exp_avg_ipt:
            raise RuntimeError("rank allocator: no importance scores yet (no step before the first mask)")

        def s(name):
            return element_score(self.exp_avg_ipt[name], self.exp_avg_unc[name])

        return [triplet_score(s(t.name_A), s(t.name_E), s(t.name_B)) for t in self.triplets]

    # -- masking ------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> torch.Tensor:
        """Prune every triplet scoring <= the (init_bgt − budget)-th smallest score; returns the threshold."""
        scores = self.triplet_scores()
        threshold = masking_threshold(torch.cat(scores), self.schedule.init_bgt - budget)
        self.keep = {}
        for t, score in zip(self.triplets, scores):
            keep = score > threshold
            t.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            self.keep[t.name_E] = keep
        return threshold

    @torch.no_grad()
    def apply_keep(self) -> None:
        for t in self.triplets:
            t.lora_E.masked_fill_(~self.keep[t.name_E].view(-1, 1), 0.0)

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """PEFT's format: {name of lora_E: [kept?] * r_init}, or None before the first mask."""
        if self.keep is None:
            return None
        return {name: keep.view(-1).tolist() for name, keep in self.keep.items()}

    # -- one call per optimizer step ---------------------------------------
    def step(self, global_step: int) -> tuple[int, torch.Tensor | None]:
        """Returns (budget, threshold) with threshold None when nothing was rescored."""
        sched = self.schedule
        if global_step < sched.final_start and self.order == "reference":
            self.update_ipt()
        budget, mask_ind = sched(global_step)
        if self.semantics == "peft":
            if global_step == sched.final_start:
                threshold = self.mask_to_budget(sched.target_bgt)
                if self.order == "reference":
                    self.exp_avg_ipt, self.exp_avg_unc = {}, {}  # PEFT's reset_ipt(): the scores are final
                return budget, threshold
            if global_step > sched.final_start and self.keep is not None:
                self.apply_keep()
                return budget, None
        if mask_ind:
            return budget, self.mask_to_budget(budget)
        return budget, None
