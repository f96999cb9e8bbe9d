"""AdaLoRA's budget schedule (paper eq. 12), its phases, and the allocator's option checks.

One place for the rules every allocator follows (``RankAllocator``, the PEFT integration and the
reference allocator in :mod:`adalora_fast.reference`):

* warm-up, ``step <= tinit``: the full budget, no mask;
* budgeting: the cubic budget, a mask every ``deltaT`` steps;
* the final phase (:meth:`BudgetSchedule.plan`): the importance is frozen from ``step == T − tfinal``;
  with ``semantics="peft"`` that step forces the mask to the target budget (it fixes the final pattern),
  with ``"loralib"`` it is the last step of the cubic branch; every later step masks to the target.
"""

from __future__ import annotations

from dataclasses import dataclass

SEMANTICS = ("peft", "loralib")
ORDERS = ("reference", "paper")


def check_betas(beta1: float, beta2: float) -> None:
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 < b < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {b}")


def check_choices(semantics: str, order: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


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

    def plan(self, step: int, semantics: str) -> tuple[int, bool, bool]:
        """(budget, score the importance?, mask?) at ``step``: the schedule with the final-phase rule.

        The importance is scored before ``T − tfinal`` only. The final pattern is a mask every step after
        ``T − tfinal`` (both semantics) and, with PEFT's, a mask forced at ``T − tfinal`` itself.
        """
        budget, mask = self(step)
        if step == self.final_start and semantics == "peft":
            mask = True
        return budget, step < self.final_start, mask
