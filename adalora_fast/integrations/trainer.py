"""``AdaLoraCallback``: AdaLoRA's allocator with the Hugging Face ``Trainer``, which never calls it itself."""

from __future__ import annotations

from transformers import TrainerCallback


def _adalora_tuner(model):
    """The AdaLoraModel inside a (possibly wrapped) PEFT model."""
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "update_and_allocate"):
        raise TypeError(f"AdaLoraCallback needs a PEFT AdaLoRA model, got {type(model).__name__}")
    return tuner


class AdaLoraCallback(TrainerCallback):
    """Calls ``update_and_allocate(global_step)`` once per optimizer step, after ``optimizer.step()`` and
    before ``zero_grad()`` (the Trainer's ``on_optimizer_step``), so gradient accumulation is respected and
    the step index is the 0-based one PEFT's examples use."""

    def __init__(self, model=None):
        self.model = model

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        _adalora_tuner(self.model if self.model is not None else model).update_and_allocate(state.global_step)
        return control
