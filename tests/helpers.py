"""Shared builders for the test suite: PEFT twins of our layers and small models."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from bench_common import LLAMA_TARGETS

from adalora_fast import FastSVDLinear
from adalora_fast.adapter import SVDAdapter


def peft_config(**kwargs):
    from peft import AdaLoraConfig

    defaults = dict(init_r=12, target_r=8, total_step=100, lora_alpha=8, target_modules=["fc1", "fc2"])
    defaults.update(kwargs)
    return AdaLoraConfig(**defaults)


def peft_svd_linear(base: nn.Linear, r: int, lora_alpha: int, lora_dropout: float = 0.0):
    """PEFT's SVDLinear around ``base`` (which it then owns)."""
    from peft.tuners.adalora import SVDLinear

    cfg = peft_config(init_r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    return SVDLinear(base, "default", config=cfg, r=r, lora_alpha=lora_alpha)


def twin_layers(in_f, out_f, r, lora_alpha=8, lora_dropout=0.0, bias=True, dtype=torch.float32, device="cpu"):
    """A FastSVDLinear and a PEFT SVDLinear holding identical weights (Λ random, so the adapter is active)."""
    ours = FastSVDLinear(in_f, out_f, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias)
    with torch.no_grad():
        ours.lora_E.normal_()
    base = nn.Linear(in_f, out_f, bias=bias)
    theirs = peft_svd_linear(base, r, lora_alpha, lora_dropout)
    with torch.no_grad():
        base.weight.copy_(ours.weight)
        if bias:
            base.bias.copy_(ours.bias)
        theirs.lora_A["default"].copy_(ours.lora_A)
        theirs.lora_E["default"].copy_(ours.lora_E)
        theirs.lora_B["default"].copy_(ours.lora_B)
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype)


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=24, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def random_singular_values(model, std: float):
    """``model`` with every Λ (lora_E) drawn from N(0, std²): PEFT initialises Λ to zero, which makes every
    adapter's output and A's and B's gradients zero."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_(std=std)
    return model


def peft_mlp(seed=0, **cfg):
    """A PEFT AdaLoRA TinyMLP with random Λ."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TinyMLP(), peft_config(**cfg))
    return random_singular_values(model, std=0.1)


def fast_mlp():
    """Two FastSVDLinear layers (12 → 16 → 6, r 4) around a tanh, with random Λ (seed 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(FastSVDLinear(12, 16, r=4, lora_alpha=4), nn.Tanh(), FastSVDLinear(16, 6, r=4, lora_alpha=4))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_E.normal_(std=0.5)
    return model


def clone(model):
    return copy.deepcopy(model)


def lora_params(model):
    """The adapter parameters (lora_A / lora_E / lora_B) of a model, in named_parameters() order."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def svd_stack(n_layers, d=16, r=4, seed=0, dropout=0.0, b_std=None, device="cpu", dtype=torch.float32):
    """``n_layers`` × (FastSVDLinear d→d, Tanh) with random Λ (and random P when ``b_std`` is given)."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        layers += [FastSVDLinear(d, d, r=r, lora_alpha=r, lora_dropout=dropout), nn.Tanh()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, FastSVDLinear):
                m.lora_E.normal_(std=0.5)
                if b_std is not None:
                    m.lora_B.normal_(std=b_std)
    return model.to(device=device, dtype=dtype)


def regression_batch(step, n=32, d=16):
    """(x, y), both n × d, drawn from a generator seeded with ``step``."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def lambdas(model):
    """Copies of every Λ (lora_E) of ``model``."""
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n]


def saved_activation_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages ``run()`` saves for its backward, ``exclude``'s storages (parameters,
    buffers) and one-element tensors (dropout seeds, scalars: bookkeeping, not activations) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.numel() > 1:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def peft_step(model, ids, step, opt=None):
    """One step of a PEFT causal LM: forward (loss with the penalty), backward, ``opt.step()`` when given,
    ``update_and_allocate(step)``; returns the detached loss. The gradients are left to the caller."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if opt is not None:
        opt.step()
    model.base_model.update_and_allocate(step)
    return loss.detach()


def tiny_llama(seed=0):
    """A randomly initialised two-layer Llama (hidden 32, vocab 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def peft_llama(seed=0, task_type="CAUSAL_LM", dtype=None, **kw):
    """Stock PEFT AdaLoRA on every linear of :func:`tiny_llama` (random Λ); ``kw`` overrides the config.

    ``dtype``: the base model's dtype before ``get_peft_model``, whose defaults then keep the adapters in
    fp32 over a half-precision model (``autocast_adapter_dtype=True``), as a user following PEFT's docs gets."""
    from peft import AdaLoraConfig, get_peft_model

    args = dict(init_r=6, target_r=3, tinit=10, tfinal=30, deltaT=5, total_step=200, lora_alpha=8,
                target_modules=LLAMA_TARGETS, orth_reg_weight=0.5)  # fmt: skip
    args.update(kw)
    base = tiny_llama(seed)
    model = get_peft_model(base.to(dtype) if dtype is not None else base, AdaLoraConfig(task_type=task_type, **args))
    return random_singular_values(model, std=0.1)


def token_batch(step, batch=4, seq=16):
    """Token ids in [0, 64) drawn from a generator seeded with ``step``."""
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 64, (batch, seq), generator=g)


def triton_svd_linear(x, weight, bias, lora_A, lora_E, lora_B, triplet_mask, scaling, ranknum, *,
                      fan_in_fan_out=False, dropout_p=0.0, training=False, seed=None, emission=None):  # fmt: skip
    """The kernel path's entry point called with the functional API's arguments (as the reference takes them)."""
    from adalora_fast.kernels.svd_adapter_op import svd_linear_triton

    adapter = SVDAdapter(lora_A, lora_E, lora_B, triplet_mask, float(scaling), ranknum, fan_in_fan_out,
                         dropout_p if training else 0.0)  # fmt: skip
    return svd_linear_triton(x, weight, bias, adapter, seed=seed, emission=emission)


class TokenDataset(torch.utils.data.Dataset):
    """``steps × 4`` rows of 16 token ids (each its own seed), as the Trainer reads a causal-LM dataset."""

    def __init__(self, steps):
        self.steps = steps

    def __len__(self):
        return self.steps * 4

    def __getitem__(self, i):
        ids = token_batch(1000 + i, batch=1)[0]
        return {"input_ids": ids, "labels": ids}


def train_with_trainer(model, out_dir, *, steps, lr, deepspeed=None, resume=None, per_device_batch=4, save=True,
                       accumulate=1):  # fmt: skip
    """A Trainer run (SGD) of a patched PEFT model with AdaLoraCallback (with ``save``, a checkpoint every
    ``steps // 2`` steps; ``accumulate`` micro-batches per step); (trainer, the rank pattern after each step)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from adalora_fast.integrations.peft import sync_rank_pattern
    from adalora_fast.integrations.trainer import AdaLoraCallback

    patterns = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            sync_rank_pattern(model.base_model)
            patterns.append(copy.deepcopy(model.peft_config["default"].rank_pattern))

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=per_device_batch, max_steps=steps,
                             gradient_accumulation_steps=accumulate,
                             learning_rate=lr, optim="sgd", deepspeed=deepspeed, use_cpu=deepspeed is None, seed=0,
                             report_to=[], save_strategy="steps" if save else "no", save_steps=steps // 2,
                             logging_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(steps), callbacks=[AdaLoraCallback(), Record()])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, patterns


def allocator_flat_state(trainer):
    """The fast allocator's flat state (its EMAs, scores, keep) after a Trainer run."""
    from adalora_fast.integrations.peft import fast_allocator

    return fast_allocator(trainer.model.base_model).state_dict()["flat"]
