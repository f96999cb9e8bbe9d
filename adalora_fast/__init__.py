"""adalora-fast: fused kernels that make AdaLoRA cost what LoRA costs.

Public API (drop-in for loralib's AdaLoRA):

* :class:`FastSVDLinear` — the adapted linear layer (W0 + P·diag(Λ)·Q).
* :class:`RankAllocator` — the importance-driven budget allocator.
* :func:`compute_orth_regu` — the orthogonality penalty.
* :func:`env_report` — which backend each op runs on here (``python -m adalora_fast.env`` prints it);
  :func:`backend_calls` — the calls each backend took.
* :func:`patch_peft` / :func:`unpatch_peft` — PEFT's AdaLoRA on these kernels;
  ``adalora_fast.integrations.trainer.AdaLoraCallback`` for the Hugging Face Trainer.
* :func:`adalora_fast.cuda_graph.capture_training_step` — a whole training step as one CUDA graph.

The PyTorch reference of every op lives in :mod:`adalora_fast.reference`.
"""

from .allocator import RankAllocator
from .integrations.peft import patch_peft, unpatch_peft
from .dispatch import backend_calls, env_report
from .penalty import compute_orth_regu
from .svd_linear import FastSVDLinear, convert_linear_layers, mark_only_lora_as_trainable
from .version import __version__

__all__ = [
    "FastSVDLinear",
    "backend_calls",
    "RankAllocator",
    "compute_orth_regu",
    "convert_linear_layers",
    "env_report",
    "mark_only_lora_as_trainable",
    "patch_peft",
    "unpatch_peft",
    "__version__",
]
