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

The schedule, its final-phase rule and the adapter triplets it works on are the production ones
(:mod:`adalora_fast.schedule`, :mod:`adalora_fast.discovery`), checked here against PEFT's own allocator;
so are the torch importance formulas (:mod:`adalora_fast.importance`). What this oracle adds is their
composition one adapter at a time (scores, threshold, masking), which the tests hold against PEFT's
allocator step for step; the kernels' epilogues and the flat state are tested against it.
"""

from __future__ import annotations

import torch

from ..discovery import AdapterTriplet, require_grad
from ..importance import element_score, sensitivity, triplet_score, update_importance_ema
from ..schedule import BudgetSchedule, check_betas, check_choices


# ---------------------------------------------------------------------------
# Element-wise importance (paper eq. 5-8): the formulas of adalora_fast.importance, which the tests check
# against PEFT's own RankAllocator through this oracle (tests/test_allocator.py); stated once.
# ---------------------------------------------------------------------------


def masking_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest triplet score; every score ``<=`` it is pruned (ties included)."""
    if not 1 <= k <= scores.numel():
        raise ValueError(f"cannot prune {k} of {scores.numel()} triplets")
    return torch.kthvalue(scores, k).values


# ---------------------------------------------------------------------------
# The allocator, one adapter at a time (on adalora_fast.schedule's BudgetSchedule)
# ---------------------------------------------------------------------------


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
        check_choices(semantics, order)
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
        budget, score_now, mask_now = sched.plan(global_step, self.semantics)
        if score_now and self.order == "reference":
            self.update_ipt()
        if self.semantics == "peft":  # PEFT's mechanics: reset_ipt() at T − tfinal, then the stored pattern
            if global_step == sched.final_start:
                threshold = self.mask_to_budget(sched.target_bgt)
                if self.order == "reference":
                    self.exp_avg_ipt, self.exp_avg_unc = {}, {}  # PEFT's reset_ipt(): the scores are final
                return budget, threshold
            if global_step > sched.final_start and self.keep is not None:
                self.apply_keep()
                return budget, None
        if mask_now:
            return budget, self.mask_to_budget(budget)
        return budget, None
