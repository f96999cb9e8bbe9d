"""``AdaLoraCallback``: AdaLoRA's allocator with the Hugging Face ``Trainer``, which never calls it itself.

It also keeps the allocator's state (EMAs, scores, masks) in the ``Trainer``'s checkpoints, one file per
rank (``adalora_fast_allocator-rank<k>.pt``: under ZeRO and FSDP2 each rank holds the EMAs of its own
partition), and restores it when training resumes from one, so a resumed run continues the schedule and
the EMAs exactly. A checkpoint's adapter is saved at full rank (the masks are in Λ), which the Trainer can
load back into the model it resumes; ``save_model`` at the end saves it resized by the rank pattern.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

ALLOCATOR_PREFIX = "adalora_fast_allocator-"
ALLOCATOR_FILE = ALLOCATOR_PREFIX + "rank{rank}.pt"


def _adalora_tuner(model):
    """The AdaLoraModel inside a (possibly wrapped) PEFT model."""
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "update_and_allocate"):
        raise TypeError(f"AdaLoraCallback needs a PEFT AdaLoRA model, got {type(model).__name__}")
    return tuner


def _process_rank(args) -> int:
    """This process's rank: torch.distributed's where it is set up (the engine's ranks: on a machine without
    accelerators Accelerate counts every DeepSpeed rank as process 0), else the Trainer's."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else args.process_index


def _checkpoint_file(args, state) -> str:
    # The Trainer's own checkpoint folder naming (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR).
    name = ALLOCATOR_FILE.format(rank=_process_rank(args))
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}", name)


class AdaLoraCallback(TrainerCallback):
    """Calls ``update_and_allocate(global_step)`` once per optimizer step, after ``optimizer.step()`` and
    before ``zero_grad()`` (the Trainer's ``on_optimizer_step``), so gradient accumulation is respected and
    the step index is the 0-based one PEFT's examples use. Under DeepSpeed, where Accelerate runs the
    engine's step inside the backward, the allocator has taken the step's gradient inside that step."""

    def __init__(self, model=None):
        self.model = model

    def _tuner(self, model):
        return _adalora_tuner(self.model if self.model is not None else model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .peft import fast_state

        # A model that takes num_items_in_batch returns a loss already normalised over the whole step: the
        # Trainer then sums it over the accumulated micro-batches (no division) and, averaging tokens across
        # ranks, multiplies it by the number of ranks. The penalty the patched forward adds is divided by the
        # same factor (stock PEFT weighs it accumulation steps × ranks times).
        ranks = args.world_size if getattr(args, "average_tokens_across_devices", False) else 1
        fast_state(self._tuner(model), create=True).trainer_loss_scale = ranks * args.gradient_accumulation_steps
        if state.global_step == 0:
            return control
        path = _checkpoint_file(args, state)
        folder = os.path.dirname(path)
        saved = os.path.isdir(folder) and any(f.startswith(ALLOCATOR_PREFIX) for f in os.listdir(folder))
        if saved and not os.path.exists(path):  # (a rank that started afresh would score apart from the others)
            raise FileNotFoundError(
                f"resuming from {folder}: it holds the allocator's state of other ranks but not {os.path.basename(path)}; "
                "resume with the ranks that saved it"
            )
        if saved:  # resuming from a checkpoint this callback saved
            from .peft import fast_allocator

            fast_allocator(self._tuner(model), create=True).load_state_dict(torch.load(path, weights_only=False))
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._tuner(model).update_and_allocate(state.global_step)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A checkpoint follows: PEFT would save the adapter resized by the rank pattern, which the Trainer cannot
        # load back into the full-rank model it resumes (stock PEFT's resume fails there with a size mismatch).
        if control.should_save:
            from .peft import fast_state

            fast_state(self._tuner(model), create=True).saving_checkpoint = True
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        from .peft import fast_allocator, fast_state, sync_rank_pattern

        tuner = self._tuner(model)
        fast_state(tuner, create=True).saving_checkpoint = False
        sync_rank_pattern(tuner)  # (the checkpoint's save left it unset)
        alloc = fast_allocator(tuner)
        if alloc is not None:
            path = _checkpoint_file(args, state)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(alloc.state_dict(), path)
        return control
