"""``RankAllocator``: AdaLoRA's budget allocator with loralib's constructor and call, on flat state.

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
found by parameter name once, at construction, as the references do
(``lora_A`` / ``lora_E`` / ``lora_B``, plus ``.<adapter_name>`` for PEFT models).

One step is a constant number of ops whatever the number of layers (see
:mod:`adalora_fast.flat_state`), with no host synchronisation: the budget is
computed on the host from integers, the threshold and the masking run on the
device, and ``rank_pattern`` is produced only when it is read.

``order`` is the one switch between the two published orders of scoring:

* ``"reference"`` (default): the sensitivity |w·∇w| is taken from θ_{t+1}, after
  the optimizer step, exactly as PEFT and loralib do; switching implementations
  changes nothing.
* ``"paper"``: Algorithm 1 of the paper, from θ_t. Every adapter must be a
  ``FastSVDLinear``; its backward emits the sensitivity, both EMAs and the
  triplet scores (in the fused kernels' epilogues, or in gradient hooks on the
  reference path), on the micro-batch that completes the optimizer step
  (``grad_accumulation_steps`` micro-batches per step), and ``update_and_mask``
  only masks. On several ranks (DDP, FSDP2, DeepSpeed ZeRO), where a layer's
  backward sees only its rank's gradient, θ_t·∇θ_t of the reduced gradient is
  taken just before the optimizer step instead (make the allocator before the
  first step). The call site is the same.

Under AMP loss scaling pass ``grad_scale`` (the factor the gradients carry, a
float or a device tensor) to ``update_and_mask`` unless the gradients were
unscaled. A non-finite sensitivity never becomes a mask: with
``nonfinite="skip"`` (default) the step's scoring and masking are skipped on the
device and a warning names the count when the state is next read; with
``"raise"`` the step checks on the host (one sync) and raises.

``capturable=True`` makes the step graph-safe, so that a whole training step
(forward, penalty, backward, optimizer, allocator) can be captured once in a
CUDA graph and replayed: the step number lives on the device (a counter that
starts at 0, advances once per call, and is saved in ``state_dict``), the
schedule is a device table built by ``set_total_step``, and every step runs the
same ops whatever its phase. ``global_step`` is then only checked against the
counter's known start (use ``set_step`` to resume), and the budget is returned
as a device scalar. It needs ``order="reference"``, ``nonfinite="skip"``, no
TensorBoard writer and unsharded adapters.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .discovery import find_adapter_triplets
from .flat_state import FlatAdapterState, ShardedAdapterState, is_sharded
from .importance import ImportanceState
from .schedule import BudgetSchedule, check_betas, check_choices

NONFINITE_POLICIES = ("skip", "raise")


def _data_parallel() -> bool:
    """Several ranks in torch.distributed's default group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_capturable(order: str, nonfinite: str, tb_writter) -> None:
    """What a graph-safe step cannot do: each of these needs the host in the middle of the step."""
    if order != "reference":
        raise ValueError("capturable=True needs order='reference' (paper order counts emissions on the host)")
    if nonfinite != "skip":
        raise ValueError("capturable=True needs nonfinite='skip' ('raise' reads the device every step)")
    if tb_writter is not None:
        raise ValueError("capturable=True cannot log to TensorBoard inside the step; read rank_pattern outside it")


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
        nonfinite: str = "skip",
        capturable: bool = False,
    ):
        check_choices(semantics, order)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
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
        self.semantics, self.order, self.nonfinite = semantics, order, nonfinite
        self.tb_writter = tb_writter
        self.log_interval = tb_writter_loginterval
        if capturable:
            _check_capturable(order, nonfinite, tb_writter)
        self.capturable = capturable
        self.triplets = find_adapter_triplets(model, adapter_name)
        if not self.triplets:
            raise ValueError("RankAllocator: the model has no AdaLoRA adapters (no lora_A / lora_E / lora_B parameters)")
        self.total_rank = sum(t.rank for t in self.triplets)
        self.target_rank = target_total_rank if target_total_rank is not None else target_rank * len(self.triplets)
        self.state = self._make_state(order, capturable)
        # Paper order on one process: the layers' backward emits the scores. On several ranks the state takes
        # θ_t·∇θ_t of the reduced gradient just before the optimizer step instead (it captures).
        self.importance_states = (
            self._attach_importance(model, grad_accumulation_steps) if order == "paper" and not self.state.capture else None
        )
        self._emissions_seen = [0] * len(self.triplets)
        self._nonfinite_reported = 0
        self.grad_scale = None
        self.schedule: BudgetSchedule | None = None
        self.schedule_table: torch.Tensor | None = None  # capturable: one row of step control per step
        self.total_step = None
        self._first_step = 0  # capturable: the counter's value as last set on the host (checked on the next call)
        if total_step is not None:
            self.set_total_step(total_step)

    def _make_state(self, order: str, capturable: bool) -> FlatAdapterState:
        """The flat state for where the adapters live: one process (or DDP), FSDP2 shards, ZeRO partitions."""
        first = self.triplets[0].lora_A
        from .integrations.deepspeed import ZeroAdapterState, zero_stage

        stage = zero_stage(first)
        kind = "sharded (FSDP2)" if is_sharded(first) else f"ZeRO-{stage} partitioned" if stage else None
        if kind is None:
            # Paper order on several ranks (DDP): the layers' backward would score this rank's gradient only;
            # θ_t·∇θ_t of the all-reduced gradient is taken in the optimizer's step pre-hook instead.
            capture = "sensitivity" if order == "paper" and _data_parallel() else None
            return FlatAdapterState(self.triplets, self.beta1, self.beta2, capture)
        if capturable:
            raise ValueError(f"capturable=True is not supported with {kind} adapters")
        if stage:
            return ZeroAdapterState(self.triplets, self.beta1, self.beta2, order)
        return ShardedAdapterState(self.triplets, self.beta1, self.beta2,
                                   capture="sensitivity" if order == "paper" else None)  # fmt: skip

    def set_total_step(self, total_step: int) -> None:
        """Fix T; validates the whole schedule (T > init_warmup + final_warmup, target < initial budget)."""
        self.schedule = BudgetSchedule(
            init_bgt=self.total_rank,
            target_bgt=self.target_rank,
            tinit=self.initial_warmup,
            tfinal=self.final_warmup,
            total_step=total_step,
            deltaT=self.mask_interval,
        )
        self.total_step = total_step
        if self.capturable:
            # Rows for steps 0..T+1; the last (T+1 is always in the final phase) stands for every later step.
            rows = [self._step_control(step) for step in range(total_step + 2)]
            table = torch.tensor([[max(k, 1), int(score), int(mask), budget] for budget, k, score, mask in rows],
                                 dtype=torch.int64)  # fmt: skip
            if self.schedule_table is not None and self.schedule_table.shape == table.shape:
                self.schedule_table.copy_(table)  # in place: a graph captured earlier reads the new schedule
            else:  # (a graph captured before a change of T must be captured again)
                self.schedule_table = table.to(self.state.device)

    def set_step(self, step: int) -> None:
        """Capturable mode: set the device step counter (to resume at ``step`` without a state dict)."""
        if not self.capturable:
            raise RuntimeError("set_step is for capturable=True; otherwise pass global_step to update_and_mask")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.state.step.fill_(step)
        self._first_step = step

    def step_count(self) -> int:
        """Capturable mode: the device step counter (reads the device: not for the hot path)."""
        return int(self.state.step)

    def set_grad_scale(self, scale: torch.Tensor | float | None) -> None:
        """The loss scale the gradients carry (AMP without unscale_), divided out of every sensitivity.

        In paper order set it before the backward that emits (e.g. ``scaler.get_scale()``, or the
        scaler's scale tensor to avoid a sync); in reference order it is the default of
        ``update_and_mask(grad_scale=...)``. On several ranks in paper order, and under ZeRO, the gradient
        is taken inside the optimizer's step, unscaled (after GradScaler or DeepSpeed has unscaled it, or,
        for a fused optimizer that GradScaler hands the scale instead, divided by that scale): this scale is
        not applied there.
        """
        self.grad_scale = scale
        for s in self.importance_states or []:
            s.grad_scale = scale

    def schedule_threshold(self, step: int) -> tuple[int, bool]:
        """(current budget, mask at this step?) as loralib names it."""
        return self._require_schedule()(step)

    def update_and_mask(
        self, model: nn.Module | None, global_step: int | None, *, grad_scale: torch.Tensor | float | None = None
    ) -> tuple[int | torch.Tensor, torch.Tensor | None]:
        """One allocator step; returns (budget, threshold as a device scalar, or None when nothing was masked).

        ``model`` is accepted for loralib compatibility; the adapters were found at construction.
        With ``capturable=True`` the step is the device counter's (``global_step`` may be None), the
        budget is a device scalar, and the threshold is always returned (it masked only on masking steps).
        """
        if self.capturable:
            return self._update_and_mask_capturable(global_step, grad_scale)
        budget, k_prune, score_now, mask_now = self._step_control(global_step)
        state = self.state
        state.set_control(k_prune, score_now, mask_now)
        scores_here = self.importance_states is None  # (else the layers' backward scored)
        if scores_here and score_now:
            state.update_from_gradients(grad_scale if grad_scale is not None else self.grad_scale)
        if scores_here:
            state.compute_scores()
            finite = state.step_finite
            if self.nonfinite == "raise" and finite is not None and not bool(finite):
                raise FloatingPointError(
                    f"RankAllocator: non-finite gradient or sensitivity at step {global_step}; no score or mask was written"
                )
        else:
            self._check_emitted(global_step, score_now)
        # (a step that does not mask leaves Λ, keep and the counters as they are: its ops are skipped on the host,
        # which knows the phase; the capturable step runs them on every step, the device choosing)
        threshold = state.mask() if mask_now else None
        if self.importance_states is not None:
            for s in self.importance_states:
                s.end_step()
                s.enabled = self.schedule.plan(global_step + 1, self.semantics)[1]  # does the next step score?
        if self.tb_writter is not None and global_step % self.log_interval == 0:
            self._log(global_step, budget, threshold)
        return budget, threshold

    def _step_control(self, global_step: int) -> tuple[int, int, bool, bool]:
        """(budget, triplets to prune, score?, mask?) at ``global_step``."""
        budget, score_now, mask_now = self._require_schedule().plan(global_step, self.semantics)
        if mask_now and self.total_rank - budget < 1:
            raise ValueError(f"step {global_step}: a budget of {budget} of {self.total_rank} prunes nothing")
        return budget, self.total_rank - budget, score_now, mask_now

    def _update_and_mask_capturable(self, global_step, grad_scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The same step with every phase running the same ops, the phase chosen on the device."""
        self._require_schedule()
        if self._first_step is not None:  # the one point where the host knows the device counter
            if global_step is not None and global_step != self._first_step:
                raise ValueError(
                    f"capturable RankAllocator: the device step counter is at {self._first_step} but global_step is "
                    f"{global_step}; to resume, call set_step({global_step}) or load_state_dict() first"
                )
            self._first_step = None
        state = self.state
        budget = state.advance_control(self.schedule_table)
        state.update_from_gradients(grad_scale if grad_scale is not None else self.grad_scale)
        state.compute_scores()
        return budget, state.mask()

    # -- reading the state (these synchronise with the device) ------------------------------------
    @property
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """PEFT's format, ``{name of lora_E: [kept?] * r_init}``; None before the first mask."""
        self._report_nonfinite()
        return self.state.rank_pattern()

    def get_rank_pattern(self) -> dict[str, list[bool]]:
        return self.rank_pattern or {}

    def ranks(self) -> dict[str, int]:
        """Kept triplets per adapted module (lora_E name → rank)."""
        pattern = self.rank_pattern
        if pattern is None:
            return {t.name_E: t.rank for t in self.triplets}
        return {name: int(sum(keep)) for name, keep in pattern.items()}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue with the same scores and masks."""
        return {
            "flat": self.state.state_dict(),
            "emissions_seen": list(self._emissions_seen),
            "importance_forwards": [s.window_forwards for s in self.importance_states or []],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.load_state_dict(state_dict["flat"])
        if self.capturable:
            self._first_step = int(self.state.step)
        self._emissions_seen = list(state_dict["emissions_seen"])
        for s, n, seen in zip(self.importance_states or [], state_dict["importance_forwards"], self._emissions_seen):
            s.restore(n, seen)

    def persistent_bytes(self) -> int:
        """Bytes of allocator state kept between steps (on this rank)."""
        tensors = self.state.persistent_tensors()
        if self.schedule_table is not None:
            tensors += (self.schedule_table,)
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- internals -----------------------------------------------------------------------------------
    def _attach_importance(self, model: nn.Module, grad_accumulation_steps: int) -> list[ImportanceState]:
        """Paper order: one ImportanceState per adapter, on views of the flat buffers, attached to its layer
        (a layer that emits importance from its backward: one with ``attach_importance``, as FastSVDLinear)."""
        owners = {id(m.lora_A): m for m in model.modules() if callable(getattr(m, "attach_importance", None))}
        states = []
        for i, t in enumerate(self.triplets):
            layer = owners.get(id(t.lora_A))
            if layer is None:
                raise ValueError(
                    f"order='paper' needs every adapter to be a FastSVDLinear (its backward emits the scores); "
                    f"{t.name_A} belongs to another layer type"
                )
            ipt, unc = self.state.ema_views(i)
            state = ImportanceState(t.lora_A, t.lora_E, t.lora_B, ipt, unc, self.beta1, self.beta2,
                                    grad_accumulation_steps, triplet_score=self.state.score_view(i))  # fmt: skip
            layer.attach_importance(state)
            states.append(state)
        return states

    def _check_emitted(self, global_step: int, score_now: bool) -> None:
        """In paper order every adapter's backward must have scored this step (until the final phase)."""
        if not score_now:
            return
        for i, (t, state) in enumerate(zip(self.triplets, self.importance_states)):
            if state.emissions == self._emissions_seen[i]:
                raise RuntimeError(
                    f"RankAllocator(order='paper'): {t.name_E} emitted no importance since the last step. Run the "
                    "forward in train() mode with gradients enabled, grad_accumulation_steps micro-batches per step, "
                    "and call the allocator after backward()."
                )
            self._emissions_seen[i] = state.emissions

    def _report_nonfinite(self) -> None:
        n = int(self.state.nonfinite_steps)
        if n > self._nonfinite_reported:
            warnings.warn(
                f"RankAllocator: {n - self._nonfinite_reported} step(s) had a non-finite gradient or score; their "
                "scoring and masking were skipped (no mask was written from them)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._nonfinite_reported = n

    def _require_schedule(self) -> BudgetSchedule:
        if self.schedule is None:
            raise RuntimeError("RankAllocator: total_step is not set; pass total_step or call set_total_step()")
        return self.schedule

    def _log(self, step: int, budget: int, threshold: torch.Tensor | None) -> None:
        for name, rank in self.ranks().items():
            self.tb_writter.add_scalar(f"Ranknum/{name}", rank, step)
        self.tb_writter.add_scalar("Budget/total_rank", budget, step)
        if threshold is not None:
            self.tb_writter.add_scalar("Budget/mask_threshold", float(threshold), step)
