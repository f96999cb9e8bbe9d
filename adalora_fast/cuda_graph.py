"""A whole training step captured once as a CUDA graph and replayed.

Eagerly, an AdaLoRA step launches a few hundred small kernels (adapter kernels, penalty, optimizer,
allocator); at small hidden sizes the host spends longer launching them than the GPU spends running them.
Replayed as a graph, the step is one launch. The step is graph-safe when every part of it is:

* the allocator: ``RankAllocator(..., capturable=True)``, or ``patch_peft(model, capturable=True)`` for
  PEFT models (the step number and schedule live on the device);
* the optimizers: ``torch.optim.AdamW(..., capturable=True)`` (their step count lives on the device);
* nothing in the step reads the device from the host (no ``.item()``, no printing the loss inside it).

The adapter kernels draw their dropout seed on the device, so every replay draws a fresh mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


class CapturedTrainingStep:
    """A captured step: calling it replays the graph (the next training step) and returns the step's outputs.

    The outputs are the tensors the step returned during the capture; every replay overwrites them in place.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any, warmup_outputs: list[Any]):
        self.graph = graph
        self.outputs = outputs
        self.warmup_outputs = warmup_outputs  # what the eager warm-up steps returned, in order

    def __call__(self) -> Any:
        self.graph.replay()
        return self.outputs


def _check_capturable_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        if "capturable" in opt.defaults and not all(group.get("capturable") for group in opt.param_groups):
            raise ValueError(
                f"{type(opt).__name__} must be built with capturable=True to be captured in a CUDA graph "
                "(otherwise its step count lives on the host and every replay repeats the captured step's update)"
            )


def capture_training_step(
    step: Callable[[], Any],
    optimizers: Iterable[torch.optim.Optimizer],
    *,
    warmup_steps: int = 3,
    before_warmup_step: Callable[[int], None] | None = None,
) -> CapturedTrainingStep:
    """Run ``warmup_steps`` real steps on a side stream, capture the next one, and return it replayable.

    ``step`` runs forward, loss, backward, the optimizer step(s) and the allocator on static input tensors
    and returns what is to be read after each replay (the detached loss, say). It must not zero the
    gradients itself: they are set to None after every warm-up step and before the capture, so that the
    captured backward writes them afresh at each replay. ``before_warmup_step(i)`` is called before
    warm-up step ``i`` (to copy batch ``i`` into the static inputs); before a replay, copy the next batch
    into them yourself.

    The warm-up steps are real training steps (they advance optimizers and allocator); they also let the
    Triton autotuner and cuBLAS choose their configurations outside the capture, which needs at least one.
    The captured step is not run by the capture: the first call runs training step ``warmup_steps``.
    """
    optimizers = list(optimizers)
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1 (autotuning cannot run inside a capture), got {warmup_steps}")
    _check_capturable_optimizers(optimizers)
    if not torch.cuda.is_available():
        raise RuntimeError("capture_training_step needs a CUDA device (CUDA graphs)")

    def zero_grad() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warmup_outputs = []
    with torch.cuda.stream(side):
        for i in range(warmup_steps):
            if before_warmup_step is not None:
                before_warmup_step(i)
            warmup_outputs.append(step())
            zero_grad()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return CapturedTrainingStep(graph, outputs, warmup_outputs)
