"""All rank-allocator state of a model's adapters in flat buffers, updated in a constant number of ops.

Layout (one dtype and device for all adapters): adapters are grouped by shape (r, in, out); within the
flat element buffers every shape group stores its Q's, then its Λ's, then its P's, so that one view
``(L, r, in)`` or ``(L, out, r)`` covers a group and the per-triplet means are one reduction per group —
the number of ops depends on the number of distinct shapes, not on the number of layers.

* ``exp_avg_ipt`` / ``exp_avg_unc``: Ī and Ū of every element (the persistent state: 2× the adapter
  parameters; PEFT keeps 3×). Paper-order layers hold views into them.
* ``scores`` (Σr): triplet scores; ``keep`` (Σr): 1 for kept, 0 for pruned, in the parameter dtype.

One step is a fixed sequence of ops whose step-dependent inputs (the number of triplets to prune,
whether to score and whether to mask) are read from a small device tensor: no host synchronisation
and static shapes. In the graph-safe form (:meth:`FlatAdapterState.advance_control`) that tensor is
looked up on the device from a per-step schedule table with a device step counter, and every step
runs the same ops whatever its phase, so one captured CUDA graph replays any step.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .discovery import AdapterTriplet, require_grad

# Slots of the per-step control tensor (and columns of the schedule table, which adds the budget).
K_PRUNE, DO_SCORE, DO_MASK, BUDGET = 0, 1, 2, 3


@dataclass
class ShapeGroup:
    members: list[int]  # indices into the triplet list, in layer order
    r: int
    in_features: int
    out_features: int
    a_offset: int = 0  # first element of this group's Q's in the flat element buffers
    e_offset: int = 0
    b_offset: int = 0
    score_offset: int = 0  # first triplet of this group in ``scores``


class FlatAdapterState:
    """The flat state; :class:`ShardedAdapterState` keeps the same buffers over FSDP2 shards.

    The constructor lays the buffers out the same way for both: the parameters in flat order
    (:meth:`_flat_order`), each as this rank holds it (:meth:`_local`), the element buffers over them, and
    one slot per triplet in ``scores`` / ``keep`` (:meth:`_triplet_layout`).
    """

    CAPTURES = (None, "gradient", "sensitivity")

    def __init__(self, triplets: list[AdapterTriplet], beta1: float, beta2: float, capture: str | None = None):
        if capture not in self.CAPTURES:
            raise ValueError(f"capture must be one of {self.CAPTURES}, got {capture!r}")
        self.capture = capture
        self.triplets, self.beta1, self.beta2 = triplets, beta1, beta2
        self.dtype, self.device = self._placement(triplets)
        # The parameters in flat order (for the one gather of θ and ∇θ) and the element buffers over them.
        self.flat_params: list[tuple[str, torch.Tensor]] = self._flat_order(triplets)
        self.param_list = [self._local(p) for _, p in self.flat_params]
        n_elements = sum(p.numel() for p in self.param_list)
        n_triplets = sum(t.rank for t in triplets)
        self.exp_avg_ipt = torch.zeros(n_elements, dtype=self.dtype, device=self.device)
        self.exp_avg_unc = torch.zeros_like(self.exp_avg_ipt)
        self.ipt_views = self._flat_views(self.exp_avg_ipt)
        self.unc_views = self._flat_views(self.exp_avg_unc)
        self.scores = torch.zeros(n_triplets, dtype=self.dtype, device=self.device)
        self.keep = torch.ones(n_triplets, dtype=self.dtype, device=self.device)
        # What multiplies Λ this step (the keep mask on a masking step, ones otherwise), with one column per layer.
        self.factor = torch.ones_like(self.keep)
        self.masked = torch.zeros((), dtype=torch.bool, device=self.device)  # any mask yet?
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.control = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)  # advanced by advance_control
        self._step_finite: torch.Tensor | None = None
        self._previous = None
        self.score_slices, self.factor_columns = self._triplet_layout(triplets)
        self.lambdas = [t.lora_E for t in triplets]
        self.captured = torch.zeros_like(self.exp_avg_ipt) if capture else None
        self.captured_views = self._flat_views(self.captured) if capture else None
        self._captured_step = False  # captured since the allocator last ran?
        self._holds: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer → steps these?
        # The CPU ops of csrc/rank_allocator_cpu.cpp, decided once: CPU buffers and the compiled ops loaded (the
        # importance update: gradients from .grad; the masking: every λ whole, as this class holds them).
        cpu_ops = self.device.type == "cpu" and _rank_allocator_ops_loaded()
        self._one_pass = capture is None and cpu_ops
        self._mask_in_one_pass = cpu_ops and type(self)._multiply_lambdas is FlatAdapterState._multiply_lambdas
        self._lambda_offsets = [s.start for s in self.score_slices]  # (each λ's first slot in factor)
        if capture:
            _capture_in_optimizer_steps(self)

    # -- the layout (what the sharded state overrides) ---------------------------------------------
    @staticmethod
    def _placement(triplets: list[AdapterTriplet]) -> tuple[torch.dtype, torch.device]:
        ref = triplets[0].lora_A
        for t in triplets:
            if t.lora_A.dtype != ref.dtype or t.lora_A.device != ref.device:
                raise ValueError(
                    f"the allocator keeps one flat state per model: every adapter must share one dtype and device, "
                    f"but {t.name_A} is {t.lora_A.dtype} on {t.lora_A.device} and {triplets[0].name_A} is "
                    f"{ref.dtype} on {ref.device}"
                )
        return ref.dtype, ref.device

    def _flat_order(self, triplets: list[AdapterTriplet]) -> list[tuple[str, torch.Tensor]]:
        """Grouped by shape: every group's Q's, then its Λ's, then its P's."""
        self.groups = self._layout(triplets)
        order = []
        for g in self.groups:
            for kind in ("A", "E", "B"):
                order += [(getattr(triplets[i], f"name_{kind}"), getattr(triplets[i], f"lora_{kind}")) for i in g.members]
        return order

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p

    def _triplet_layout(self, triplets: list[AdapterTriplet]) -> tuple[list[slice], list[torch.Tensor]]:
        """(each triplet's slice of ``scores``, the column of ``factor`` that multiplies its Λ)."""
        slices: list[slice] = [slice(0, 0)] * len(triplets)
        for g in self.groups:
            for pos, i in enumerate(g.members):
                start = g.score_offset + pos * g.r
                slices[i] = slice(start, start + g.r)
        return slices, [self.factor[s].view(-1, 1) for s in slices]

    @staticmethod
    def _layout(triplets: list[AdapterTriplet]) -> list[ShapeGroup]:
        groups: dict[tuple, ShapeGroup] = {}
        for i, t in enumerate(triplets):
            key = (t.rank, t.in_features, t.out_features)
            if key not in groups:
                groups[key] = ShapeGroup([], *key)
            groups[key].members.append(i)
        offset = score = 0
        for g in groups.values():
            n = len(g.members)
            g.a_offset, g.e_offset, g.b_offset = offset, offset + n * g.r * g.in_features, offset + n * g.r * (g.in_features + 1)
            offset += n * g.r * (g.in_features + 1 + g.out_features)
            g.score_offset, score = score, score + n * g.r
        return list(groups.values())

    def _flat_views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``buffer`` shaped like ``self.param_list``, in the same order (made once)."""
        views, offset = [], 0
        for p in self.param_list:
            views.append(buffer[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    # -- what others read and write -----------------------------------------------------------------
    @property
    def step_finite(self) -> torch.Tensor | None:
        """Whether this step's sensitivity was finite (device bool), None before it scores."""
        return self._step_finite

    def persistent_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every buffer kept between steps."""
        return (self.exp_avg_ipt, self.exp_avg_unc, self.scores, self.keep, self.factor, self.masked,
                self.nonfinite_steps, self.control, self.step)  # fmt: skip

    def ema_views(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(Ī, Ū) of triplet ``index`` as {lora_A, lora_E, lora_B} views (what a paper-order layer writes)."""
        return self.element_views(self.exp_avg_ipt, index), self.element_views(self.exp_avg_unc, index)

    def score_view(self, index: int) -> torch.Tensor:
        """Triplet ``index``'s slice of ``scores`` (a view)."""
        return self.scores[self.score_slices[index]]

    @torch.no_grad()
    def load_named_emas(self, exp_avg_ipt: dict[str, torch.Tensor], exp_avg_unc: dict[str, torch.Tensor]) -> None:
        """Ī and Ū from per-parameter dicts keyed by parameter name (PEFT's and loralib's format); parameters
        missing from a dict keep their values."""
        for (name, _), ipt, unc in zip(self.flat_params, self.ipt_views, self.unc_views):
            if name in exp_avg_ipt:
                ipt.copy_(exp_avg_ipt[name])
            if name in exp_avg_unc:
                unc.copy_(exp_avg_unc[name])

    @torch.no_grad()
    def load_keep(self, pattern: dict[str, list[bool]]) -> None:
        """A rank pattern ({name of lora_E: [kept?] * r}) as the current mask; adapters missing from it keep all."""
        for t, s in zip(self.triplets, self.score_slices):
            keep = pattern.get(t.name_E)
            if keep is not None:
                self.keep[s].copy_(torch.tensor(keep, dtype=self.keep.dtype))
        self.masked.fill_(True)

    # -- views held by the layers -----------------------------------------------------------------
    def element_views(self, buffer: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """{lora_A, lora_E, lora_B} views of ``buffer`` shaped like triplet ``index``'s parameters."""
        for g in self.groups:
            if index in g.members:
                pos, r, k, o = g.members.index(index), g.r, g.in_features, g.out_features
                return {
                    "lora_A": buffer[g.a_offset + pos * r * k : g.a_offset + (pos + 1) * r * k].view(r, k),
                    "lora_E": buffer[g.e_offset + pos * r : g.e_offset + (pos + 1) * r].view(r, 1),
                    "lora_B": buffer[g.b_offset + pos * o * r : g.b_offset + (pos + 1) * o * r].view(o, r),
                }
        raise IndexError(index)

    # -- one step -----------------------------------------------------------------------------------
    def set_control(self, k_prune: int, score: bool, mask: bool) -> None:
        """The step's inputs, copied to the device without a sync.

        A fresh pinned buffer each step: the caching host allocator keeps it until the asynchronous copy
        has run, so a host that runs ahead of the device cannot overwrite a step's control.
        """
        host = torch.tensor([max(k_prune, 1), int(score), int(mask)], dtype=torch.int64,
                            pin_memory=self.device.type == "cuda")  # fmt: skip
        self.control.copy_(host, non_blocking=True)
        self._step_finite = None  # set when this step scores

    def advance_control(self, table: torch.Tensor) -> torch.Tensor:
        """The graph-safe form of :meth:`set_control`: this step's row of ``table`` (steps × 4: k, score,
        mask, budget; the last row stands for every later step), found on the device from the step
        counter, which then advances. Returns the step's budget (device scalar)."""
        row = table.index_select(0, torch.clamp(self.step, max=table.shape[0] - 1).view(1)).view(-1)
        self.control.copy_(row[:BUDGET])
        self.step.add_(1)
        self._step_finite = None
        return row[BUDGET]

    @torch.no_grad()
    def update_from_gradients(self, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Sensitivity and both EMAs for every element, from θ and ∇θ now; returns 'all finite' (device bool).

        Multi-tensor ops over the parameter list and persistent views of the flat EMAs (one op each,
        whatever the number of layers). A step whose sensitivity is not finite leaves the EMAs as they
        were and is counted in ``nonfinite_steps``.
        """
        fused = self._update_in_one_pass(grad_scale)
        if fused is not None:
            return fused
        finite = self._update_emas(grad_scale)
        self._settle(finite)
        return finite

    def _update_in_one_pass(self, grad_scale) -> torch.Tensor | None:
        """On CPU tensors, with the gradients read from ``.grad``: the whole update (and :meth:`_settle`) as one
        C++ pass, ``torch.ops.adalora_fast.importance_update_`` (csrc/rank_allocator_cpu.cpp), which rounds every
        intermediate as the ATen ops of :meth:`_update_emas` do: the same EMAs bit for bit, without ~25 ops
        over the flat buffers and two multi-tensor ops that a CPU runs tensor by tensor. None where those ops
        run instead (CUDA tensors, a capture, no extension, a gradient of another dtype or layout)."""
        if not self._one_pass:
            return None
        if torch.is_tensor(grad_scale):
            # (a tensor of more dims than none takes part in type promotion: a float64 one makes the ATen
            # division float64, which this pass, dividing in the parameters' opmath type, does not do)
            if grad_scale.device.type != "cpu" or grad_scale.numel() != 1 or (
                grad_scale.dim() and grad_scale.dtype == torch.float64 and self.dtype != torch.float64
            ):
                return None
            grad_scale = float(grad_scale)
        params, grads = self._gradient_lists()
        flags = torch.ops.adalora_fast.importance_update_(
            params, grads, self.exp_avg_ipt, self.exp_avg_unc, self.nonfinite_steps, self.control, DO_SCORE,
            self.beta1, self.beta2, None if grad_scale is None else float(grad_scale),
        )  # fmt: skip
        if not flags:
            return None
        finite, self._step_finite = flags
        return finite

    def _gradient_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        grads = [p.grad for _, p in self.flat_params]
        for (name, p), g in zip(self.flat_params, grads):
            if g is None:
                require_grad(name, p)  # raises, naming the parameter
        return self.param_list, grads

    # -- the capture (``capture``: where the sensitivity's gradient comes from) -----------------------
    # * None: the parameters' ``.grad`` when the allocator runs (after the optimizer step: reference order).
    # * "gradient": copied just before the optimizer step (an engine that frees the gradients in its step);
    #   the allocator multiplies it by θ after the step (reference order).
    # * "sensitivity": θ·∇θ formed just before the step, from θ_t and the reduced gradient (paper order where
    #   the layers' backward sees only this rank's gradient: DDP, FSDP2, ZeRO).
    def capture_from(self, optimizer) -> None:
        """Called before every ``torch.optim`` step: capture if ``optimizer`` steps these adapters."""
        first = self.flat_params[0][1]
        if optimizer not in self._holds:
            self._holds[optimizer] = any(p is first for g in optimizer.param_groups for p in g["params"])
        if self._holds[optimizer]:
            # GradScaler leaves the gradients scaled for an optimizer that unscales inside its step (fused
            # AdamW, fused SGD): it sets the scale they carry on the optimizer for that step (None if unscaled)
            self.capture_before_step(getattr(optimizer, "grad_scale", None))

    def capture_before_step(self, grad_scale: torch.Tensor | float | None = None) -> None:
        """Just before the optimizer step: this rank's elements of the reduced gradient (or of θ·∇θ), with
        ``grad_scale``, the loss scale the gradients still carry, divided out."""
        params, grads = self._gradient_lists()
        self._capture(self.captured_views, grads, params, grad_scale, whole=True)

    @torch.no_grad()
    def _capture(self, views: list[torch.Tensor], grads: list[torch.Tensor], thetas: list[torch.Tensor],
                 grad_scale: torch.Tensor | float | None, whole: bool = False) -> None:  # fmt: skip
        """The capture itself: ``grads`` into their ``views`` of the captured buffer, ``grad_scale`` divided
        out, times θ (``thetas``) for a sensitivity capture. ``whole``: the views cover the buffer (one
        division for all)."""
        torch._foreach_copy_(views, grads)
        if grad_scale is not None:  # (GradScaler's tensor lives on the device of the first gradients it saw)
            if torch.is_tensor(grad_scale):
                grad_scale = grad_scale.to(self.captured.device)
            if whole:
                self.captured.div_(grad_scale)
            else:
                torch._foreach_div_(views, grad_scale)
        if self.capture == "sensitivity":
            torch._foreach_mul_(views, thetas)
        self._captured_step = True

    def _sensitivity_into_unc(self) -> None:
        """θ·∇θ of every element into Ū's flat buffer (its views): from the gradients now, or as captured."""
        if self.capture is None:
            params, grads = self._gradient_lists()
            torch._foreach_copy_(self.unc_views, params)
            torch._foreach_mul_(self.unc_views, grads)
            return
        if not self._captured_step:
            raise RuntimeError(
                "rank allocator: no gradient was captured before this optimizer step. On several ranks the "
                "allocator takes it in the optimizer's step: make the allocator before the step it scores "
                "(before training starts, after the engine is set up)"
            )
        self._captured_step = False
        if self.capture == "sensitivity":
            self.exp_avg_unc.copy_(self.captured)
        else:  # θ after the step: this rank's elements, as viewed at construction (the engines keep them in place)
            torch._foreach_copy_(self.unc_views, self.param_list)
            self.exp_avg_unc.mul_(self.captured)

    def _update_emas(self, grad_scale) -> torch.Tensor:
        """Write the new Ī, Ū (keeping the previous ones aside); returns whether this shard's I was finite.

        I = |θ·∇θ| is formed in Ū's flat buffer (its previous value set aside first) by two multi-tensor ops
        over its views; the rest of the update is a few ops on whole buffers, whatever the number of adapters
        (each multi-tensor op costs host work per tensor on a CPU)."""
        self._previous = (self.exp_avg_ipt.clone(), self.exp_avg_unc.clone())
        prev_ipt, prev_unc = self._previous
        self._sensitivity_into_unc()
        ipt = self.exp_avg_unc.abs_()
        # Scores from unscaled gradients under AMP loss scaling. (A gradient captured in the optimizer's step is
        # the one it applies: GradScaler and DeepSpeed unscale before the step.)
        if grad_scale is not None and self.capture is None:
            ipt.div_(grad_scale)
        finite = torch.isfinite(ipt).all()
        # The references' expressions, term for term (bitwise equal in fp32):
        # Ī ← β1·Ī + (1−β1)·I;  Ū ← β2·Ū + (1−β2)·|I − Ī|
        avg = torch.add(prev_ipt * self.beta1, ipt * (1 - self.beta1), out=self.exp_avg_ipt)
        dev = (ipt - avg).abs_()
        torch.add(prev_unc * self.beta2, dev * (1 - self.beta2), out=self.exp_avg_unc)
        return finite

    def _settle(self, finite: torch.Tensor) -> None:
        """Keep the new EMAs only on a scoring step whose sensitivity was finite everywhere."""
        scoring = self.control[DO_SCORE] != 0
        apply = finite & scoring
        torch.where(apply, self.exp_avg_ipt, self._previous[0], out=self.exp_avg_ipt)
        torch.where(apply, self.exp_avg_unc, self._previous[1], out=self.exp_avg_unc)
        self._previous = None
        self.nonfinite_steps.add_((~finite & scoring).long())
        self._step_finite = finite | ~scoring  # a step that does not score is not held back by its gradients

    @torch.no_grad()
    def compute_scores(self) -> None:
        """S = s(λ) + mean_j s(Q_ij) + mean_j s(P_ji) for every triplet, one reduction per shape group."""
        s = self.exp_avg_ipt * self.exp_avg_unc
        for g in self.groups:
            n, r, k, o = len(g.members), g.r, g.in_features, g.out_features
            s_a = torch.mean(s[g.a_offset : g.a_offset + n * r * k].view(n, r, k), dim=2)
            s_e = s[g.e_offset : g.e_offset + n * r].view(n, r)
            s_b = torch.mean(s[g.b_offset : g.b_offset + n * o * r].view(n, o, r), dim=1)
            self.scores[g.score_offset : g.score_offset + n * r].view(n, r).copy_(s_e + (s_a + s_b))

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """Where the control says so: prune every triplet scoring <= the k-th smallest (ties included) by
        zeroing its λ; never on a step whose sensitivity was not finite. Returns the threshold (device scalar).

        On CPU tensors all of it is one C++ pass (``mask_to_budget_``, csrc/rank_allocator_cpu.cpp): the same
        threshold, keep, factor and Λ as the ops below."""
        if self._mask_in_one_pass:
            threshold = torch.ops.adalora_fast.mask_to_budget_(
                self.scores, self.keep, self.factor, self.lambdas, self._lambda_offsets, self.masked,
                self.nonfinite_steps, self.control, K_PRUNE, DO_MASK, self._step_finite,
            )  # fmt: skip
            if threshold:
                return threshold[0]
        k = self.control[K_PRUNE : K_PRUNE + 1]
        threshold = torch.sort(self.scores).values.index_select(0, k - 1).squeeze(0)  # = kthvalue(scores, k)
        do_mask = self.control[DO_MASK] != 0
        if self._step_finite is not None:
            do_mask = do_mask & self._step_finite
        scores_ok = torch.isfinite(self.scores).all()
        self.nonfinite_steps.add_((do_mask & ~scores_ok).long())
        do_mask = do_mask & scores_ok
        new_keep = (self.scores > threshold).to(self.dtype)
        self.keep.copy_(torch.where(do_mask, new_keep, self.keep))
        torch.where(do_mask, self.keep, torch.ones_like(self.keep), out=self.factor)
        self._multiply_lambdas()
        self.masked.logical_or_(do_mask)
        return threshold

    def _multiply_lambdas(self) -> None:
        torch._foreach_mul_(self.lambdas, self.factor_columns)

    # -- reading the state (host syncs allowed: not on the hot path) --------------------------------
    def rank_pattern(self) -> dict[str, list[bool]] | None:
        if not bool(self.masked):
            return None
        keep = self.keep.detach().cpu().bool()
        return {t.name_E: keep[s].tolist() for t, s in zip(self.triplets, self.score_slices)}

    def state_dict(self) -> dict:
        return {
            "layout": [(t.name_E, t.rank, t.in_features, t.out_features) for t in self.triplets],
            "exp_avg_ipt": self.exp_avg_ipt.clone(),
            "exp_avg_unc": self.exp_avg_unc.clone(),
            "scores": self.scores.clone(),
            "keep": self.keep.clone(),
            "masked": self.masked.clone(),
            "nonfinite_steps": self.nonfinite_steps.clone(),
            "step": self.step.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        layout = [(t.name_E, t.rank, t.in_features, t.out_features) for t in self.triplets]
        if [tuple(x) for x in state["layout"]] != layout:
            raise ValueError("allocator state does not match this model's adapters (names, ranks or shapes differ)")
        for name in ("exp_avg_ipt", "exp_avg_unc", "scores", "keep", "masked", "nonfinite_steps"):
            getattr(self, name).copy_(state[name])
        if "step" in state:
            self.step.copy_(state["step"])


def _rank_allocator_ops_loaded() -> bool:
    from .extension import load_extension

    return load_extension()[0] is not None and hasattr(torch.ops.adalora_fast, "mask_to_budget_")


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return ()
    return DTensor


_DTENSOR = None  # DTensor's class, () without torch.distributed: looked up once (the penalty asks per factor)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor parameter (FSDP2's ``fully_shard``)."""
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = _dtensor_class()
    return isinstance(t, _DTENSOR)


def _dim0_shard(p) -> tuple[int, int]:
    """(first global row, local rows) of a DTensor sharded along dim 0 as FSDP2 does (torch.chunk split)."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"sharded adapters must be sharded along dim 0 on a 1-D mesh (FSDP2), got {placements}")
    mesh = p.device_mesh
    n, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    local = p.to_local().shape[0]
    if local != max(0, min(chunk, n - start)):
        raise ValueError(f"unexpected shard layout: {local} local rows of {n} on rank {rank} of {world}")
    return start, local


class PartitionedAdapterState(FlatAdapterState):
    """The flat state over adapters partitioned across data-parallel ranks: this rank holds one contiguous
    range of every parameter's flattened elements (possibly empty): FSDP2's rows, a ZeRO partition's fragment.

    Ī and Ū cover the local elements only. Each rank scores its elements and scatters them into a replicated
    (Σr,) vector — λ_i and the elements of Q's row i where it holds them (weight 1/in), the elements of P's
    column i (weight 1/out) — and one all-reduce per step (not per layer) sums them, the finiteness flag riding
    along, so that every rank thresholds the same scores and masks its part of Λ the same way.

    Subclasses say where this rank's elements are: :meth:`_span`, :meth:`_local`, :meth:`_local_grad` and
    :meth:`_lambda_targets`; ``self.group`` is the data-parallel process group.
    """

    def __init__(self, triplets: list[AdapterTriplet], beta1: float, beta2: float, capture: str | None = None):
        import torch.distributed as dist

        self._dist = dist
        super().__init__(triplets, beta1, beta2, capture)
        self._pending_finite: torch.Tensor | None = None  # this rank's, until compute_scores settles the step
        self._lambda_mul: tuple[list, list] | None = None  # _lambda_targets(), found at the first mask

    # -- what a subclass says about a parameter -----------------------------------------------------
    def _span(self, p) -> tuple[int, int]:
        """(first element of ``p``'s flattened elements held here, how many)."""
        raise NotImplementedError

    def _local_grad(self, name: str, p) -> torch.Tensor:
        """This rank's elements of ``p``'s (reduced) gradient, shaped like ``_local(p)``."""
        raise NotImplementedError

    def _lambda_targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(every tensor that holds this rank's Λ values, the slice of ``factor`` that multiplies each)."""
        raise NotImplementedError

    # -- the layout ---------------------------------------------------------------------------------
    def _placement(self, triplets):
        ref = triplets[0].lora_A
        return ref.dtype, self._local(ref).device

    def _flat_order(self, triplets):
        """Triplet by triplet (Q, Λ, P): the local parts have no common shapes to group by."""
        return [pair for t in triplets for pair in t.named()]

    def _triplet_layout(self, triplets):
        """Also where each local element's score lands in the replicated ``scores`` (``slot_index``) and with
        what weight (1/in for Q, 1 for λ, 1/out for P)."""
        slices, slot_index, weights = [], [], []
        self.lambda_spans = []  # (first triplet of the adapter in ``scores``, first λ held here, how many)
        offset = 0
        for t in triplets:
            r, in_f, out_f = t.rank, t.in_features, t.out_features
            slices.append(slice(offset, offset + r))
            a = torch.arange(*_range(self._span(t.lora_A)))
            e0, e_n = self._span(t.lora_E)
            b = torch.arange(*_range(self._span(t.lora_B)))
            slot_index += [offset + a // in_f, offset + torch.arange(e0, e0 + e_n), offset + b % r]
            weights += [torch.full((len(a),), 1.0 / in_f), torch.ones(e_n), torch.full((len(b),), 1.0 / out_f)]
            self.lambda_spans.append((offset, e0, e_n))
            offset += r
        self.slot_index = torch.cat(slot_index).to(self.device)
        self.slot_weight = torch.cat(weights).to(self.device, self.dtype)
        return slices, []

    def element_views(self, buffer, index):
        raise NotImplementedError("per-adapter EMA views are not kept for partitioned adapters")

    def _spans(self) -> list[tuple[int, int]]:
        return [tuple(self._span(p)) for _, p in self.flat_params]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "spans": self._spans()}  # (the EMAs cover this rank's elements only)

    def load_state_dict(self, state: dict) -> None:
        saved, now = [tuple(s) for s in state.get("spans", [])], self._spans()
        if saved != now:
            differ = next((f"{name}: elements {a} saved, {b} here" for (name, _), a, b in zip(self.flat_params, saved, now)
                           if a != b), "the number of parameters")  # fmt: skip
            raise ValueError(
                "allocator state saved on another partitioning of the adapters (another world size or engine "
                f"setup; {differ}): each rank's state covers its own elements; resume with the same setup"
            )
        super().load_state_dict(state)

    def load_named_emas(self, exp_avg_ipt, exp_avg_unc):
        if exp_avg_ipt or exp_avg_unc:  # (a model that has not trained yet brings none)
            raise NotImplementedError("importing per-parameter EMAs is not supported with partitioned adapters")

    # -- one step -----------------------------------------------------------------------------------
    def _gradient_lists(self):
        return [self._local(p) for _, p in self.flat_params], [self._local_grad(n, p) for n, p in self.flat_params]

    @torch.no_grad()
    def update_from_gradients(self, grad_scale=None) -> torch.Tensor:
        """The local EMAs; returns whether this rank's sensitivity was finite (device bool). Whether to keep
        them is decided with the other ranks in compute_scores."""
        self._pending_finite = self._update_emas(grad_scale)
        return self._pending_finite

    @torch.no_grad()
    def compute_scores(self) -> None:
        s = self.exp_avg_ipt * self.exp_avg_unc
        contrib = torch.zeros(len(self.scores) + 1, dtype=torch.float32, device=self.device)
        contrib[:-1].index_add_(0, self.slot_index, (s * self.slot_weight).float())
        pending = self._pending_finite
        if pending is not None:
            contrib[-1] = (~pending).float()
        self._dist.all_reduce(contrib, group=self.group)  # the one collective of the step
        new_scores = contrib[:-1].to(self.dtype)
        if pending is not None:
            self._pending_finite = None
            finite = contrib[-1] == 0  # finite on every rank
            self._settle(finite)
            new_scores = torch.where(finite, new_scores, self.scores)  # a skipped step keeps the last scores
        self.scores.copy_(new_scores)

    def _multiply_lambdas(self) -> None:
        if self._lambda_mul is None:  # (views that stay valid: the engines update their tensors in place)
            self._lambda_mul = self._lambda_targets()
        tensors, factors = self._lambda_mul
        if tensors:
            torch._foreach_mul_(tensors, factors)

    def _factor_span(self, index: int, whole: bool = False) -> torch.Tensor:
        """The slice of ``factor`` for adapter ``index``'s λ held here (all r of them with ``whole``), 1-D."""
        offset, e0, e_n = self.lambda_spans[index]
        if whole:
            return self.factor[offset : offset + self.triplets[index].rank]
        return self.factor[offset + e0 : offset + e0 + e_n]


def _range(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[0] + span[1]


class ShardedAdapterState(PartitionedAdapterState):
    """FSDP2 (``fully_shard``): adapters are DTensors sharded along dim 0; the local rows are the span."""

    def __init__(self, triplets: list[AdapterTriplet], beta1: float, beta2: float, capture: str | None = None):
        self.group = triplets[0].lora_A.device_mesh.get_group()
        super().__init__(triplets, beta1, beta2, capture)
        self._lambdas_local = [t.lora_E.to_local() for t in triplets]

    @staticmethod
    def _local(p):
        return p.to_local()

    def _span(self, p):
        start, rows = _dim0_shard(p)
        cols = math.prod(p.shape[1:])
        return start * cols, rows * cols

    def _local_grad(self, name, p):
        return require_grad(name, p).to_local()

    def _lambda_targets(self):
        return self._lambdas_local, [self._factor_span(i).view(-1, 1) for i in range(len(self.triplets))]


_CAPTURING: "weakref.WeakSet[FlatAdapterState]" = weakref.WeakSet()
_CAPTURE_HOOK = None


def _capture_in_optimizer_steps(state: FlatAdapterState) -> None:
    """Have ``state.capture_from(optimizer)`` called before every ``torch.optim`` step (one global step
    pre-hook for all states; a state leaves with its allocator)."""
    global _CAPTURE_HOOK
    _CAPTURING.add(state)
    if _CAPTURE_HOOK is None:

        def hook(optimizer, args, kwargs):
            for live in list(_CAPTURING):
                live.capture_from(optimizer)

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _CAPTURE_HOOK = register_optimizer_step_pre_hook(hook)
