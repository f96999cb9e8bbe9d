"""Where a training step's time goes: host time, device time and the kernels, per provider, in one run.

    python benchmarks/profile_step.py --model llama_160m --providers peft_lora,adalora_fast,adalora_fast_graph \
        --out profile.md

The same step as the training-step benchmark (``benchmarks/bench_common.py``). For each provider, after the
warm-up, ``--steps`` steps are timed, then as many run under ``torch.profiler``: the report gives the wall
time per step (from the unprofiled steps), the device time per step (the sum of the kernels', memcpys' and
memsets'), the kernels per step (each kernel of a replayed CUDA graph counts), and the kernels that take
the most device time. A step whose wall time is well above its device time is bound by the host (launch
overhead), one where they are close by the kernels. On a CPU a tiny fp32 model runs (a smoke test of the script; no device time).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import GRAPH_PROVIDERS, TRAINING_PROVIDERS, llama_training_model, training_step_runner


def _device_rows(prof) -> list:
    """The rows of work that ran on the GPU: kernels, memcpys, memsets (not the GPU-side user annotations,
    such as the optimizer's step range, which span kernels already counted)."""
    rows = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
    return [e for e in rows if not getattr(e, "is_user_annotation", False) and e.self_device_time_total > 0]


def profile_provider(provider: str, shape: str, *, batch: int, seq: int, dropout: float, steps: int, device, dtype,
                     top: int = 12) -> dict:  # fmt: skip
    """Time ``steps`` training steps of ``provider``, then profile as many: wall and device ms per step,
    kernels per step, the top kernels."""
    model = llama_training_model(provider, shape, dropout=dropout, seq=seq, device=device, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    run, losses = training_step_runner(model, provider, ids)
    start = time.perf_counter()  # the wall time without the profiler's own per-op cost
    for _ in range(steps):
        run()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            run()
    rows = _device_rows(prof)
    ranked = sorted(rows, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    result = {
        "provider": provider,
        "wall_ms": wall_ms,
        "device_ms": sum(e.self_device_time_total for e in rows) / 1e3 / steps,
        "kernels": sum(e.count for e in rows) / steps,
        "top": [(e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in ranked],
        "final_loss": float(losses[-1]),
    }
    del model, run, losses, prof
    gc.collect()  # (patched models hold reference cycles) before the next provider's model is built
    if cuda:
        torch.cuda.empty_cache()
    return result


def markdown(results: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| provider | wall ms / step | device ms / step | kernels / step |", "|---|---|---|---|"]
    lines += [f"| {r['provider']} | {r['wall_ms']:.2f} | {r['device_ms']:.2f} | {r['kernels']:.0f} |" for r in results]
    for r in results:
        lines += ["", f"Top kernels, {r['provider']} (device ms per step, calls per step):", ""]
        lines += ["| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{name[:90]}` | {ms:.3f} | {count:.0f} |" for name, ms, count in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="llama_160m" if cuda else "tiny")
    default_providers = TRAINING_PROVIDERS + (GRAPH_PROVIDERS if cuda else ())
    parser.add_argument("--providers", default=",".join(default_providers))
    parser.add_argument("--batch", type=int, default=8 if cuda else 2)
    parser.add_argument("--seq", type=int, default=512 if cuda else 16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="markdown file to append the report to")
    args = parser.parse_args(argv)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    results = [
        profile_provider(p, args.model, batch=args.batch, seq=args.seq, dropout=args.dropout, steps=args.steps,
                         device=device, dtype=dtype)  # fmt: skip
        for p in args.providers.split(",")
    ]
    title = f"Profile: {args.model}, {args.batch}x{args.seq} tokens, dropout {args.dropout}, {str(dtype)[6:]}, {device}"
    report = markdown(results, title)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
