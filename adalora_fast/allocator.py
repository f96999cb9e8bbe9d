"""``RankAllocator``: AdaLoRA's budget allocator with loralib's constructor and call.

Usage, as in loralib::

    allocator = RankAllocator(model, lora_r=12, target_rank=8, init_warmup=500, final_warmup=1500,
                              mask_interval=10, beta1=0.85, beta2=0.85, total_step=total)
    for step, batch in enumerate(loader):
        (loss + compute_orth_regu(model, regu_weight=0.1)).backward()
        optimizer.step()
        allocator.update_and_mask(model, step)   # after the step, before zero_grad
        optimizer.zero_grad()

Call it once per optimizer step, after ``optimizer.step()`` and before
``zero_grad()``, so that it scores the accumulated gradient. Adapters are
found by parameter name, as the references do (``lora_A`` / ``lora_E`` /
``lora_B``, plus ``.<adapter_name>`` for PEFT models).

``order`` is the one switch between the two published orders of scoring:

* ``"reference"`` (default): the sensitivity |w·∇w| is taken from θ_{t+1}, after
  the optimizer step, exactly as PEFT and loralib do; switching implementations
  changes nothing.
* ``"paper"``: Algorithm 1 of the paper, from θ_t. Every adapter must be a
  ``FastSVDLinear``; its backward emits the sensitivity, both EMAs and the
  triplet scores (in the fused kernels' epilogues, or in gradient hooks on the
  reference path), on the micro-batch that completes the optimizer step
  (``grad_accumulation_steps`` micro-batches per step), and ``update_and_mask``
  only masks. The call site is the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .discovery import find_adapter_triplets
from .importance import ImportanceState
from .reference.allocator import ORDERS, SEMANTICS, BudgetSchedule, ReferenceRankAllocator, check_betas
from .svd_linear import FastSVDLinear


class RankAllocator:
    def __init__(
        self,
        model: nn.Module,
        lora_r: int,
        target_rank: int,
        init_warmup: int,
        final_warmup: int,
        mask_interval: int,
        beta1: float,
        beta2: float,
        total_step: int | None = None,
        target_total_rank: int | None = None,
        tb_writter=None,
        tb_writter_loginterval: int = 500,
        *,
        adapter_name: str | None = None,
        semantics: str = "loralib",
        order: str = "reference",
        grad_accumulation_steps: int = 1,
    ):
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        check_betas(beta1, beta2)
        if target_total_rank is None and target_rank >= lora_r:
            raise ValueError(f"target_rank ({target_rank}) must be < the initial rank lora_r ({lora_r})")
        self.lora_init_rank = lora_r
        self.ave_target_rank = target_rank
        self.target_total_rank = target_total_rank
        self.initial_warmup = init_warmup
        self.final_warmup = final_warmup
        self.mask_interval = mask_interval
        self.beta1, self.beta2 = beta1, beta2
        self.semantics = semantics
        self.order = order
        self.tb_writter = tb_writter
        self.log_interval = tb_writter_loginterval
        self.triplets = find_adapter_triplets(model, adapter_name)
        if not self.triplets:
            raise ValueError("RankAllocator: the model has no AdaLoRA adapters (no lora_A / lora_E / lora_B parameters)")
        self.total_rank = sum(t.rank for t in self.triplets)
        self.target_rank = target_total_rank if target_total_rank is not None else target_rank * len(self.triplets)
        self.importance_states = (
            self._attach_importance(model, grad_accumulation_steps) if order == "paper" else None
        )
        self._emissions_seen = [0] * len(self.triplets)
        self._engine: ReferenceRankAllocator | None = None
        self.total_step = None
        if total_step is not None:
            self.set_total_step(total_step)

    def set_total_step(self, total_step: int) -> None:
        """Fix T; validates the whole schedule (T > init_warmup + final_warmup, target < initial budget)."""
        schedule = BudgetSchedule(
            init_bgt=self.total_rank,
            target_bgt=self.target_rank,
            tinit=self.initial_warmup,
            tfinal=self.final_warmup,
            total_step=total_step,
            deltaT=self.mask_interval,
        )
        self.total_step = total_step
        previous = self._engine
        self._engine = ReferenceRankAllocator(
            self.triplets, schedule, self.beta1, self.beta2, self.semantics, self.order
        )
        self._engine.importance_states = self.importance_states
        if previous is not None:  # keep the scores and the last mask
            self._engine.exp_avg_ipt, self._engine.exp_avg_unc = previous.exp_avg_ipt, previous.exp_avg_unc
            self._engine.keep = previous.keep

    def schedule_threshold(self, step: int) -> tuple[int, bool]:
        """(current budget, mask at this step?) as loralib names it."""
        return self._require_engine().schedule(step)

    def update_and_mask(self, model: nn.Module | None, global_step: int) -> tuple[int, float | None]:
        """One allocator step; returns (budget, threshold or None), like loralib.

        ``model`` is accepted for loralib compatibility; the adapters were found
        at construction.
        """
        engine = self._require_engine()
        if self.importance_states is not None:
            self._check_emitted(global_step)
        budget, threshold = engine.step(global_step)
        if self.importance_states is not None:
            for state in self.importance_states:
                state.end_step()
                state.enabled = global_step + 1 < engine.schedule.final_start  # no scoring in the final phase
        if self.tb_writter is not None and global_step % self.log_interval == 0:
            self._log(global_step, budget, threshold)
        return budget, None if threshold is None else float(threshold)

    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """PEFT's format, ``{name of lora_E: [kept?] * r_init}``; None before the first mask."""
        return None if self._engine is None else self._engine.rank_pattern()

    def get_rank_pattern(self) -> dict[str, list[bool]]:
        return self.rank_pattern or {}

    def ranks(self) -> dict[str, int]:
        """Kept triplets per adapted module (lora_E name → rank)."""
        pattern = self.rank_pattern
        if pattern is None:
            return {t.name_E: t.rank for t in self.triplets}
        return {name: int(sum(keep)) for name, keep in pattern.items()}

    def _attach_importance(self, model: nn.Module, grad_accumulation_steps: int) -> list[ImportanceState]:
        """Paper order: one ImportanceState per adapter, attached to its FastSVDLinear."""
        owners = {id(m.lora_A): m for m in model.modules() if isinstance(m, FastSVDLinear)}
        states = []
        for t in self.triplets:
            layer = owners.get(id(t.lora_A))
            if layer is None:
                raise ValueError(
                    f"order='paper' needs every adapter to be a FastSVDLinear (its backward emits the scores); "
                    f"{t.name_A} belongs to another layer type"
                )
            ipt = {n: torch.zeros_like(p) for n, p in (("lora_A", t.lora_A), ("lora_E", t.lora_E), ("lora_B", t.lora_B))}
            unc = {n: torch.zeros_like(v) for n, v in ipt.items()}
            if layer.importance is not None:
                layer.importance.remove()
            layer.importance = ImportanceState(
                t.lora_A, t.lora_E, t.lora_B, ipt, unc, self.beta1, self.beta2, grad_accumulation_steps
            )
            states.append(layer.importance)
        return states

    def _check_emitted(self, global_step: int) -> None:
        """In paper order every adapter's backward must have scored this step (until the final phase)."""
        if global_step >= self._engine.schedule.final_start:
            return
        for i, (t, state) in enumerate(zip(self.triplets, self.importance_states)):
            if state.emissions == self._emissions_seen[i]:
                raise RuntimeError(
                    f"RankAllocator(order='paper'): {t.name_E} emitted no importance since the last step. Run the "
                    "forward in train() mode with gradients enabled, grad_accumulation_steps micro-batches per step, "
                    "and call the allocator after backward()."
                )
            self._emissions_seen[i] = state.emissions

    def _require_engine(self) -> ReferenceRankAllocator:
        if self._engine is None:
            raise RuntimeError("RankAllocator: total_step is not set; pass total_step or call set_total_step()")
        return self._engine

    def _log(self, step: int, budget: int, threshold: torch.Tensor | None) -> None:
        for name, rank in self.ranks().items():
            self.tb_writter.add_scalar(f"Ranknum/{name}", rank, step)
        self.tb_writter.add_scalar("Budget/total_rank", budget, step)
        if threshold is not None:
            self.tb_writter.add_scalar("Budget/mask_threshold", float(threshold), step)
