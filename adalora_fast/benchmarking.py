"""Side-by-side layer timing: the fast layer, PEFT's LoRA Linear and AdaLoRA SVDLinear, the frozen nn.Linear.

Shared by the demo's timing table and ``benchmarks/`` (pytest-benchmark, host_overhead.py), so both
measure the same providers built the same way. Ratios are only meaningful between providers
measured in the same run. The benchmarks' other workloads (Llama training steps, the MiniLM fine-tune)
are in ``benchmarks/bench_common.py``, outside the installed package.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .importance import ImportanceState
from .svd_linear import FastSVDLinear

PROVIDERS = ("adalora_fast", "peft_lora", "peft_svdlinear", "frozen_linear")
# PEFT LoRA's rank beside AdaLoRA's r 12: the rank AdaLoRA's budget is usually set to end at.
LORA_RANK = 8
# The fast layer with paper-order importance emitted by every backward (what the sensitivity costs).
EMITTING_PROVIDER = "adalora_fast_emit"


def build_layer(provider: str, in_f: int, out_f: int, r: int, *, dropout: float = 0.0, dtype=torch.float32, device="cpu"):
    """One layer of the given provider, trainable parts as in AdaLoRA training, Λ non-zero."""
    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    if provider == "frozen_linear":
        return base
    if provider in ("adalora_fast", EMITTING_PROVIDER):
        layer = FastSVDLinear.from_linear(base, r, lora_alpha=16, lora_dropout=dropout)
        with torch.no_grad():
            layer.lora_E.normal_()
        if provider == EMITTING_PROVIDER:
            params = (layer.lora_A, layer.lora_E, layer.lora_B)
            ipt = dict(zip(("lora_A", "lora_E", "lora_B"), (torch.zeros_like(p) for p in params)))
            unc = {n: torch.zeros_like(t) for n, t in ipt.items()}
            layer.attach_importance(ImportanceState(*params, ipt, unc, beta1=0.85, beta2=0.85))
        return layer
    if provider == "peft_lora":
        return peft_lora_linear(base, min(LORA_RANK, r), lora_alpha=16, dropout=dropout).to(device=device, dtype=dtype)
    if provider == "peft_svdlinear":
        from peft import AdaLoraConfig
        from peft.tuners.adalora import SVDLinear

        cfg = AdaLoraConfig(init_r=r, target_r=max(r // 2, 1), total_step=10, lora_alpha=16, lora_dropout=dropout)
        layer = SVDLinear(base, "default", config=cfg, r=r, lora_alpha=16).to(device=device, dtype=dtype)
        with torch.no_grad():
            layer.lora_E["default"].normal_()
        return layer
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS + (EMITTING_PROVIDER,)}")


def peft_lora_linear(base: nn.Linear, r: int, lora_alpha: int, dropout: float) -> nn.Module:
    """PEFT's LoRA ``Linear`` around ``base`` (built directly, as get_peft_model builds it), B non-zero as after a
    few steps."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["fc"])
    layer = Linear(base, "default", config=cfg, r=r, lora_alpha=lora_alpha, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def layer_step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A closure running ``forward`` or ``forward+backward`` of ``layer`` on ``x``."""
    if mode == "forward":

        def run():
            with torch.no_grad():
                layer(x)

        return run
    if mode == "forward_backward":
        grad_out = None

        def run():
            nonlocal grad_out
            y = layer(x)
            if grad_out is None:
                grad_out = torch.randn_like(y)
            y.backward(grad_out)
            for p in layer.parameters():
                p.grad = None
            x.grad = None

        return run
    raise ValueError(f"mode must be 'forward' or 'forward_backward', got {mode!r}")


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_median_ms(fns: dict[str, Callable[[], None]], device="cpu", warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Median wall time of each closure, timed round-robin so drift and noise hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync_device(device)
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare_layers(
    tokens: int, in_f: int, out_f: int, r: int, *, dropout: float = 0.0, dtype=torch.float32, device="cpu",
    modes=("forward", "forward_backward"), iters: int = 10,
) -> list[dict]:  # fmt: skip
    """Median times of every available provider, interleaved in one run; ratios to the frozen layer."""
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    layers = {}
    for provider in PROVIDERS:
        try:
            layers[provider] = build_layer(provider, in_f, out_f, r, dropout=dropout, dtype=dtype, device=device)
        except ImportError:
            continue  # PEFT not installed: that column is left out
    rows = []
    for mode in modes:
        times = interleaved_median_ms({p: layer_step(m, x, mode) for p, m in layers.items()}, device, iters=iters)
        for provider, ms in times.items():
            rows.append(dict(mode=mode, provider=provider, ms=ms, ratio=ms / times["frozen_linear"]))
    return rows
