"""End-to-end demo: AdaLoRA fine-tuning of a small transformer with FastSVDLinear.

    python -m adalora_fast.demo [--steps 300]

Builds a small decoder-only transformer, adapts every linear layer with
``FastSVDLinear``, trains only the adapters on a synthetic sequence task with
the rank allocator and the orthogonality penalty, and prints the loss, the
ranks allocated per layer and a timing table (fast layer vs PEFT's SVDLinear
vs the frozen nn.Linear). The demo says which path the adapter took: where the
dispatcher runs the PyTorch reference (a CPU, or ``ADALORA_FAST_BACKEND=reference``)
the fast layer computes what PEFT's SVDLinear computes, the same way, so the
timing table shows no speed-up there; the fused kernels run on CUDA GPUs, and
the figures measured on one are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import RankAllocator, compute_orth_regu, convert_linear_layers, env_report, mark_only_lora_as_trainable
from . import dispatch
from .benchmarking import compare_layers
from .svd_linear import FastSVDLinear

GPU_FIGURES = "BENCHMARKS.md (at the top of the adalora-fast repository)"


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.norm1(h)
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.down_proj(F.gelu(self.up_proj(self.norm2(h))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, d_ff: int = 128, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm(h))


def synthetic_batch(batch: int, seq: int, vocab: int, generator: torch.Generator, device) -> torch.Tensor:
    """Sequences with x[t+1] = (x[t] + x[t-1]) mod vocab: learnable only by attending two tokens back."""
    x = torch.empty(batch, seq + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (batch, 2), generator=generator)
    for t in range(2, seq + 1):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    return x.to(device)


def train(steps: int = 300, init_r: int = 12, target_r: int = 6, seed: int = 0, device: str | None = None, log_every: int = 50, quiet: bool = False):  # fmt: skip
    """Train the adapters; returns the losses, the final ranks and the model."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    vocab, seq = 32, 32
    model = TinyTransformer(vocab=vocab, seq=seq).to(device)
    convert_linear_layers(model, r=init_r, lora_alpha=2 * init_r)
    mark_only_lora_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    tinit, tfinal = steps // 10, steps // 5
    allocator = RankAllocator(
        model, lora_r=init_r, target_rank=target_r, init_warmup=tinit, final_warmup=tfinal,
        mask_interval=10, beta1=0.85, beta2=0.85, total_step=steps,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = synthetic_batch(32, seq, vocab, gen, device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        (loss + compute_orth_regu(model, regu_weight=0.1)).backward()
        optimizer.step()
        allocator.update_and_mask(model, step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not quiet and (step % log_every == 0 or step == steps - 1):
            budget, _ = allocator.schedule_threshold(step)
            print(f"step {step:4d}  loss {loss.item():.4f}  budget {budget}")
    return losses, allocator.ranks(), model


def _print_ranks(ranks: dict[str, int], init_r: int) -> None:
    print(f"\nranks allocated per layer (of {init_r}):")
    width = max(len(n) for n in ranks)
    for name, rank in ranks.items():
        print(f"  {name.replace('.lora_E', ''):<{width}}  {rank:2d}  {'#' * rank}")
    print(f"  total {sum(ranks.values())} of {init_r * len(ranks)}")


def _print_timings(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"  {'mode':<17}{'provider':<16}{'median ms':>10}{'vs frozen':>11}")
    for row in rows:
        print(f"  {row['mode']:<17}{row['provider']:<16}{row['ms']:>10.3f}{row['ratio']:>10.2f}x")


def adapter_path(device, dtype, in_f: int = 64, out_f: int = 64, r: int = 4) -> tuple[str, str | None]:
    """(``"triton"`` or ``"reference"``, why the reference) for a FastSVDLinear on ``device`` in ``dtype``:
    the dispatcher's own decision (:func:`adalora_fast.dispatch.adapter_backend`), not a guess from the device."""
    layer = FastSVDLinear(in_f, out_f, r=r, device=device, dtype=dtype)
    x = torch.empty(1, in_f, device=device, dtype=dtype)
    backend = dispatch.adapter_backend(x, layer.weight, layer.lora_A, layer.lora_E, layer.lora_B)
    if backend == "triton":
        return backend, None
    if dispatch.requested_backend() == "reference":
        return backend, f"{dispatch.BACKEND_ENV}=reference"
    reason = dispatch.triton_unavailable_reason(x, layer.weight, layer.lora_A, layer.lora_E, layer.lora_B)
    return backend, reason or f"the input is on {x.device}; the fused kernels run on CUDA tensors"


def path_note(backend: str, reason: str | None) -> str:
    """What the timing table can and cannot show, given the path the adapter took."""
    if backend == "triton":
        return (
            "The adapter ran the fused Triton kernels. Timings move from run to run: compare the ratios, which "
            f"were measured side by side. Figures from a full benchmark run: {GPU_FIGURES}."
        )
    return (
        f"The adapter ran its PyTorch reference here ({reason}). That is the computation PEFT's SVDLinear does, "
        "done the same way, so adalora_fast and peft_svdlinear cost about the same above: no speed-up is expected "
        "on this path. The speed-up comes from the fused Triton kernels, which run on CUDA GPUs; the figures "
        f"measured on GPUs, against PEFT, are in {GPU_FIGURES}."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-iters", type=int, default=10)
    args = parser.parse_args(argv)

    report = env_report()
    print(f"adalora-fast demo on {report['device']} (torch {report['torch']}, triton {report['triton']})")
    print(f"adapter backend: {report['svd_adapter']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend, reason = adapter_path(device, torch.float32)
    if backend == "reference":
        print("  (the PyTorch reference: the same results as PEFT, at PEFT's speed; the kernels run on CUDA GPUs)")
    print()
    t0 = time.perf_counter()
    losses, ranks, _ = train(args.steps, args.init_r, args.target_r, args.seed)
    train_s = time.perf_counter() - t0
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"\nloss {first:.4f} -> {last:.4f} over {args.steps} steps ({train_s:.1f} s; chance level {math.log(32):.4f})")
    _print_ranks(ranks, args.init_r)

    cuda = device == "cuda"
    shape = (8192, 4096, 4096) if cuda else (2048, 512, 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    backend, reason = adapter_path(device, dtype, r=args.init_r)  # the dispatcher's choice does not depend on the size
    rows = compare_layers(*shape, args.init_r, dtype=dtype, device=device, iters=args.bench_iters)
    _print_timings(rows, f"layer timing, {shape[0]} tokens x {shape[1]} -> {shape[2]}, r={args.init_r}, {dtype}, "
                         f"adapter on the {'fused kernels' if backend == 'triton' else 'PyTorch reference'}, one run:")  # fmt: skip
    note = path_note(backend, reason)
    print("\n" + textwrap.fill(note, 100))
    return dict(losses=losses, ranks=ranks, timings=rows, adapter_backend=backend, note=note)


if __name__ == "__main__":
    main()
