"""DeepSpeed ZeRO (stages 1, 2 and 3): the rank allocator on adapters that DeepSpeed partitions.

ZeRO keeps each rank's part of the reduced gradient in its own buffers, only between the backward and
its optimizer step (the step frees them, and the ``Trainer``, through Accelerate, runs ``engine.step()``
inside its backward). So the allocator takes this rank's elements of the gradient (or, in paper order,
of θ_t·∇θ_t) inside that step, in a ``torch.optim`` step pre-hook on the optimizer that ZeRO steps over
its fp32 master partitions: there the gradient is the one the step applies, unscaled from the loss scale
and clipped, as one process's ``clip_grad_norm_`` then ``optimizer.step()`` would apply it. After the step
(where the user, or :class:`~adalora_fast.integrations.trainer.AdaLoraCallback`, calls it) the allocator
scores it as on one process.

Where this rank's elements are:

* ZeRO-1/2: every rank holds the whole (low-precision) parameters; the optimizer partitions one flat
  buffer of all of them, so a parameter has a contiguous fragment on each rank whose partition it meets
  (``param._hp_mapping``), with its gradient and its fp32 master copy.
* ZeRO-3: each parameter's flattened elements are split evenly (the last rank's part padded), held as
  ``param.ds_tensor``, with the fp32 master partition in the optimizer.

Masking writes λ where DeepSpeed keeps it: the module's λ (all of it in ZeRO-1/2, this rank's partition in
ZeRO-3) and this rank's part of the fp32 master copy, which the next step would otherwise copy back.

The orthogonality penalty needs every P and Q whole: ZeRO-3 factors that are partitioned when it runs (it
runs after the model's forward, where ZeRO-3 has released them unless the penalty is part of the engine's
forward, as in PEFT's) are gathered together, in one coalesced all-gather per call, and their gradients go
back to ZeRO's reduction like any other (:func:`gather_partitioned`).

One collective per optimizer step: the all-reduce of the triplet scores (see
:class:`~adalora_fast.flat_state.PartitionedAdapterState`). What is not supported raises an error that
names it: optimizer or parameter offload (the master copy and gradients live in host or NVMe buffers).
"""

from __future__ import annotations

import torch

from ..discovery import AdapterTriplet
from ..flat_state import PartitionedAdapterState


def zero_stage(p: torch.Tensor) -> int | None:
    """3 for a ZeRO-3 parameter, 2 for one under a ZeRO-1/2 optimizer (both map fragments alike), else None."""
    if hasattr(p, "ds_id"):
        return 3
    if hasattr(p, "_hp_mapping"):
        return 2
    return None


def _check_supported(p) -> None:
    offloaded = []
    z3_optimizer = getattr(p, "_z3_optimizer", None)
    if z3_optimizer is not None:
        offloaded = [f for f in ("offload_optimizer", "offload_param") if getattr(z3_optimizer, f, False)]
    elif getattr(p, "_hp_mapping", None) is not None and p._hp_mapping.use_offload:
        offloaded = ["offload_optimizer"]
    if offloaded:
        feature = " and ".join(offloaded)
        raise NotImplementedError(
            f"adalora-fast's allocator does not support DeepSpeed's {feature} (the gradients and the fp32 "
            f"master copy it scores and masks live in host or NVMe buffers there); turn {feature} off"
        )


class ZeroAdapterState(PartitionedAdapterState):
    """The allocator's flat state over ZeRO-partitioned adapters (see the module's docstring)."""

    def __init__(self, triplets: list[AdapterTriplet], beta1: float, beta2: float, order: str = "reference"):
        import torch.distributed as dist

        p = triplets[0].lora_A
        self.stage = zero_stage(p)
        self.group = p.ds_process_group if self.stage == 3 else p._dp_group
        self._rank = dist.get_rank(group=self.group)
        for t in triplets:
            for _, q in t.named():
                _check_supported(q)
        super().__init__(triplets, beta1, beta2, capture="sensitivity" if order == "paper" else "gradient")
        # This rank's part of each parameter's fp32 master copy (None where it holds none of it): what the
        # inner optimizer steps, found in its param groups by storage.
        self.masters = [self._master(q) for _, q in self.flat_params]

    # -- where this rank's elements are -------------------------------------------------------------
    def _span(self, p):
        if self.stage == 3:
            n = p.partition_numel()
            start = min(self._rank * n, p.ds_numel)
            return start, min(n, p.ds_numel - start)
        mapping = p._hp_mapping
        if mapping is None:
            return 0, 0
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def _local(self, p):
        start, n = self._span(p)
        if self.stage == 3:
            return p.ds_tensor.view(-1).narrow(0, 0, n)
        return p.data.view(-1).narrow(0, start, n)

    def _master(self, p) -> torch.Tensor | None:
        """This rank's part of ``p``'s fp32 master copy in the optimizer (None where it holds none)."""
        _, n = self._span(p)
        if n == 0:
            return None
        if self.stage == 3:
            return p._z3_optimizer.get_local_fp32_param(p).view(-1).narrow(0, 0, n)
        return p._hp_mapping.get_hp_fragment().view(-1)

    def _lambda_targets(self):
        tensors, factors = [], []
        for i, t in enumerate(self.triplets):
            lam = t.lora_E
            if self.stage == 3:
                tensors.append(self._local(lam))
                factors.append(self._factor_span(i))
            else:  # every rank holds the whole low-precision λ
                tensors.append(lam.data.view(-1))
                factors.append(self._factor_span(i, whole=True))
            master = self._master(lam)
            if master is not None:
                tensors.append(master)
                factors.append(self._factor_span(i))
        return tensors, factors

    # -- the capture ----------------------------------------------------------------------------------
    @torch.no_grad()
    def capture_from(self, optimizer) -> None:
        """In a step of the inner optimizer (ZeRO steps one param group, or sub-group, at a time): for every
        parameter whose master partition it steps now, the gradient it applies (and θ_t, in paper order)."""
        flats = {t.untyped_storage().data_ptr(): t for g in optimizer.param_groups for t in g["params"]}
        views, grads, thetas = [], [], []
        for k, master in enumerate(self.masters):
            flat = None if master is None else flats.get(master.untyped_storage().data_ptr())
            if flat is None or flat.grad is None:
                continue
            offset = master.storage_offset() - flat.storage_offset()
            views.append(self.captured_views[k])
            grads.append(flat.grad.view(-1).narrow(0, offset, master.numel()))
            thetas.append(master)
        if views:  # (a loss scale left on the gradients for the optimizer to divide out is divided out here too)
            self._capture(views, grads, thetas, getattr(optimizer, "grad_scale", None))

    def _sensitivity_into_unc(self) -> None:
        if self.exp_avg_unc.numel() == 0:  # (this rank holds none of the adapters: nothing was captured)
            return
        super()._sensitivity_into_unc()


def is_partitioned_now(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose elements are not gathered on this rank at the moment."""
    status = getattr(p, "ds_status", None)
    return status is not None and status.name == "NOT_AVAILABLE"


class _GatheredCopy(torch.autograd.Function):
    """Whole copies of parameters that are gathered while it runs; the gradients flow back to them whole,
    where ZeRO-3's gradient hooks reduce and partition them."""

    @staticmethod
    def forward(ctx, *params):
        return tuple(p.detach().clone() for p in params)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def gather_partitioned(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``factors`` with every ZeRO-3 parameter that is partitioned now replaced by a whole, differentiable
    copy, all gathered in one coalesced all-gather (the others as they are)."""
    import deepspeed

    index = [k for k, f in enumerate(factors) if is_partitioned_now(f)]
    partitioned = [factors[k] for k in index]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        whole = _GatheredCopy.apply(*partitioned)
    out = list(factors)
    for k, w in zip(index, whole):
        out[k] = w
    return out
