"""Host cost of a whole training step, phase by phase: PEFT LoRA, stock PEFT AdaLoRA and adalora-fast.

    python benchmarks/step_overhead.py [--quick] [--layers 8] [--hidden 32] [--steps 5] [--repeats 15] [--profile]

A Llama-style model of tiny width with many adapted modules (q,k,v,o,gate,up,down in every layer: 56 at
the default 8 layers), so that the step's cost is the host's: PEFT LoRA r 8, stock PEFT AdaLoRA init_r 12 →
target_r 8 and the patched PEFT model (``patch_peft``, the same AdaLoRA config), built as
``bench_common.llama_training_model`` builds them; beside it the same patched model with launch programs off
(``adalora_fast_python_launches``: each layer call launches its kernels from Python instead of as one C++
autograd node, ``kernels/launch.py``). One step is split into its phases: ``forward`` (the loss
and, for AdaLoRA, the orthogonality penalty), ``backward``, ``optimizer`` (AdamW: foreach, or with
``--optimizer fused`` the fused one, the ``Trainer``'s default),
``allocator`` (``update_and_allocate``; none for LoRA) and ``zero_grad``. For each phase: the host time,
the ops that reach the dispatcher (aten and custom ops, counted by a ``TorchDispatchMode``) and the Triton
launches (``adalora_fast.kernels.launch.launch_counts()``).

Without a GPU the kernels go through Triton's compiled launch path on the fake CUDA driver
(``tests/tooling/fake_driver.py``, prepared as ``host_overhead.py`` prepares it), and the penalty runs the
compiled extension op as on CUDA tensors (on CPU tensors the dispatcher keeps the reference unless the op
is asked for: this process asks). The host time is this thread's CPU time. The kernels do not run there,
so adalora-fast's adapter outputs and gradients are unwritten memory and its losses mean nothing (NaN soon);
its step runs the same ops whatever the values (the allocator's non-finite path included), which is what
is measured. With a GPU the same phases
are timed on it (bf16 model, fp32 adapters, as ``get_peft_model`` leaves them) and each provider also
reports its wall time and device time (torch.profiler) per step, with the step captured as one CUDA
graph (``*_graph``) beside the eager step.

All providers are interleaved in one run: ``--repeats`` rounds, each running a block of ``--steps`` steps
of every provider. The whole step is the best block (its per-step mean); each phase is the best of its
``steps × repeats`` single steps. Ratios are meaningful only between providers of the same run. (15 rounds by
default: on a busy 2-core host, 7 left the whole step's ratio moving between 0.84× and 1.06× from run to
run, its best blocks not found for every provider.)

Beside them, the floor: the same model without adapters, every weight frozen but the token embeddings (so
that the backward still runs through every layer, as it must to reach the adapters), timed in its forward
and backward only. Each adapter provider's cost per adapted module is its phase's time above the floor's,
divided by the modules: what the layers, the penalty and their autograd nodes add to the model's own work,
and what bounds any target on the whole step.

A table of one adapted layer at the model's shapes follows (the frozen base, PEFT's layers, the patched PEFT
layer and ``FastSVDLinear``, timed as ``host_overhead.py`` times them), then the targets: adalora-fast's whole step,
forward and allocator against PEFT LoRA's, the patched PEFT layer against ``FastSVDLinear``.
``--profile`` adds where the host time of each phase goes, by function (cProfile), for PEFT LoRA and
adalora-fast.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

import host_overhead
from host_overhead import _md, _prepare_process

PROVIDERS = ("frozen_model", "peft_lora", "peft_adalora", "adalora_fast", "adalora_fast_python_launches")
ADAPTERS = PROVIDERS[1:]  # the providers that train adapters (the frozen model is the floor they are measured above)
LABELS = {
    "frozen_model": "the frozen model, no adapters (the floor; forward + backward only)",
    "peft_lora": "PEFT LoRA (r 8)",
    "peft_adalora": "stock PEFT AdaLoRA (r 12)",
    "adalora_fast": "adalora-fast (patched PEFT, r 12)",
    "adalora_fast_python_launches": "adalora-fast, launch programs off (each layer launches from Python)",
    "peft_lora_graph": "PEFT LoRA, CUDA graph",
    "adalora_fast_graph": "adalora-fast, CUDA graph",
}
SHORT = {"frozen_model": "frozen model", "peft_lora": "PEFT LoRA", "peft_adalora": "stock AdaLoRA",
         "adalora_fast": "adalora-fast", "adalora_fast_python_launches": "adalora-fast (programs off)"}
PHASES = ("forward", "backward", "optimizer", "allocator", "zero_grad")
PHASE_LABELS = {"forward": "forward + loss + penalty"}

GPU = False  # decided in main(), before adalora_fast is imported


_clock = time.thread_time_ns  # the host's time: this thread's CPU time (on a GPU too: no sync inside a phase)


@contextlib.contextmanager
def provider_settings(provider: str):
    """The process-wide settings a provider runs under: launch programs off for ``adalora_fast_python_launches``
    (the same model as ``adalora_fast``: what the fused layer's C++ node saves, in the same run)."""
    from adalora_fast.kernels import launch

    launch.set_launch_programs(provider != "adalora_fast_python_launches")
    try:
        yield
    finally:
        launch.set_launch_programs(True)


def _sync():
    if GPU:
        import torch

        torch.cuda.synchronize()


def _penalty_on_extension() -> None:
    """On CPU tensors the dispatcher runs the penalty's reference unless the compiled op is asked for: ask for
    it in this process, so that the penalty costs what it costs on a GPU."""
    from adalora_fast import dispatch

    choose = dispatch.penalty_backend
    dispatch.penalty_backend = lambda t, requested=None: choose(t, requested or "extension")


def llama_shape(args) -> dict:
    heads = max(1, args.hidden // 8)
    return dict(hidden_size=args.hidden, intermediate_size=args.intermediate or 2 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                vocab_size=args.vocab)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------------------


def _op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Every op that reaches the dispatcher's Python key (below autograd: what runs, not what is written)."""

        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def _launches() -> int:
    from adalora_fast.kernels.launch import launch_counts

    return sum(launch_counts().values())


def count_phases(phases: dict) -> dict[str, tuple[int, int]]:
    """{phase: (ops, Triton launches)} over one step."""
    counts = {}
    for name, fn in phases.items():
        launches = _launches()
        with _op_counter() as counter:
            fn()
        _sync()
        counts[name] = (counter.count, _launches() - launches)
    return counts


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def _block(phases: dict, steps: int) -> tuple[float, dict[str, list[float]], float]:
    """(host ms per step, {phase: [ms of each step]}, wall ms per step) of ``steps`` steps; the host time is
    the phases' (no sync inside them), the wall time the block's with a sync at its end."""
    per_phase = {name: [] for name in phases}
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection inside a block is noise, not the step's cost
    try:
        _sync()
        wall0 = time.perf_counter_ns()
        for _ in range(steps):
            for name, fn in phases.items():
                t0 = _clock()
                fn()
                per_phase[name].append((_clock() - t0) / 1e6)
        _sync()
        wall = (time.perf_counter_ns() - wall0) / 1e6 / steps
    finally:
        if gc_was_on:
            gc.enable()
    host = sum(sum(ts) for ts in per_phase.values()) / steps
    return host, per_phase, wall


def _graph_block(run, steps: int) -> tuple[float, float]:
    """(host ms, wall ms) per replay of a captured step (``run`` replays and synchronises)."""
    gc.disable()
    try:
        wall0, t0 = time.perf_counter_ns(), _clock()
        for _ in range(steps):
            run()
        return (_clock() - t0) / 1e6 / steps, (time.perf_counter_ns() - wall0) / 1e6 / steps
    finally:
        gc.enable()


def device_ms(run, steps: int) -> float:
    """GPU only: device ms per step (kernels, memcpys, memsets) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from profile_step import _device_rows

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        _sync()
    return sum(e.self_device_time_total for e in _device_rows(prof)) / 1e3 / steps


def penalty_op_ms(model, number: int, repeats: int) -> tuple[float, float]:
    """(forward, backward) ms of the penalty's compiled op alone on the model's factors. On CPU tensors that
    is the extension's CPU loops, work a GPU does on the device: a share of the forward and backward rows
    that is not host overhead there."""
    import torch

    from adalora_fast.discovery import find_orth_matrices

    mats = find_orth_matrices(model, "default")
    factors, rights = [p for _, p, _ in mats], [int(right) for _, _, right in mats]
    ops = torch.ops.adalora_fast
    with torch.no_grad():
        loss, dev, sq_norms = ops.orth_penalty_forward(factors, rights, "fro")
        grad = torch.ones_like(loss)
        t = host_overhead.measure({
            "forward": (lambda: ops.orth_penalty_forward(factors, rights, "fro"), None),
            "backward": (lambda: ops.orth_penalty_backward(grad, factors, rights, dev, sq_norms, "fro"), None),
        }, number, repeats)  # fmt: skip
    return t["forward"] / 1e3, t["backward"] / 1e3


def build(provider: str, args, device, dtype):
    """(the model, its TrainingStep (a FrozenModelStep for the floor) or None for a graph provider, a run() of
    one whole step)."""
    import torch

    from bench_common import TrainingStep, llama_training_model, training_step_runner

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device,
                        generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    fused = args.optimizer == "fused"
    if provider == "frozen_model":
        model = frozen_llama(args, device, dtype)
        step = FrozenModelStep(model, ids)
    else:
        model = llama_training_model(provider, llama_shape(args), dropout=args.dropout, seq=args.seq, device=device,
                                     dtype=dtype)  # fmt: skip
        if provider.endswith("_graph"):
            run, _ = training_step_runner(model, provider, ids, fused=fused)
            return model, None, run
        step = TrainingStep(model, provider, ids, foreach=not fused, fused=fused)
    phases = step.phases()

    def run():
        for fn in phases.values():
            fn()
        _sync()

    with provider_settings(provider):
        for _ in range(3):  # compile, autotune, the optimizer's and allocator's state
            run()
    return model, step, run


def frozen_llama(args, device, dtype):
    """The benchmark's Llama without adapters, every parameter frozen but the token embeddings (the first
    layer's input), so that its backward runs through every layer as an adapted model's does."""
    from bench_common import llama_base_model

    model = llama_base_model(llama_shape(args), seq=args.seq, device=device, dtype=dtype)
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


class FrozenModelStep:
    """The floor's phases: ``TrainingStep``'s forward with its loss, and the backward (its gradients are
    dropped each step: there is no optimizer to give them to)."""

    def __init__(self, model, ids):
        from bench_common import TrainingStep

        self.model, self.ids, self.loss = model, ids, None
        self.embedding = model.get_input_embeddings().weight
        self._forward = TrainingStep.forward

    def forward(self) -> None:
        self._forward(self)

    def backward(self) -> None:
        self.loss.backward()
        self.embedding.grad = None

    def phases(self) -> dict:
        return {"forward": self.forward, "backward": self.backward}


def measure_steps(args, device, dtype, providers) -> dict:
    """Per provider: host and wall ms per step (best block), each phase's best ms, ops and launches per phase."""
    built = {p: build(p, args, device, dtype) for p in providers}
    best = {p: {"host": float("inf"), "wall": float("inf"), "phases": {}} for p in providers}
    for _ in range(args.repeats):
        gc.collect()
        for p, (_, step, run) in built.items():
            with provider_settings(p):
                if step is None:
                    host, wall = _graph_block(run, args.steps)
                    per_phase = {}
                else:
                    host, per_phase, wall = _block(step.phases(), args.steps)
            r = best[p]
            r["host"], r["wall"] = min(r["host"], host), min(r["wall"], wall)
            for name, ts in per_phase.items():
                r["phases"][name] = min(r["phases"].get(name, float("inf")), *ts)
    for p, (model, step, run) in built.items():
        with provider_settings(p):
            if step is not None:
                best[p]["counts"] = count_phases(step.phases())
            if GPU:
                best[p]["device"] = device_ms(run, args.steps)
            elif p == "adalora_fast":
                best[p]["penalty_op"] = penalty_op_ms(model, args.steps, args.repeats)
    return best


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


def step_table(results: dict) -> str:
    lora = results["peft_lora"]
    headers = ["provider", "host ms / step", "/ PEFT LoRA", "sum of best phases ms", "ops / step",
               "Triton launches / step"] + (["wall ms / step", "device ms / step"] if GPU else [])  # fmt: skip
    rows = []
    for p, r in results.items():
        counts = r.get("counts")
        row = [LABELS[p], f"{r['host']:.2f}", f"{r['host'] / lora['host']:.2f}×",
               f"{sum(r['phases'].values()):.2f}" if r["phases"] else "—",
               sum(c[0] for c in counts.values()) if counts else "—",
               sum(c[1] for c in counts.values()) if counts else "—"]  # fmt: skip
        if GPU:
            row += [f"{r['wall']:.2f}", f"{r['device']:.2f}"]
        rows.append(row)
    return _md(headers, rows)


def phase_table(results: dict) -> str:
    """One row per phase: each eager provider's best ms (its ratio to PEFT LoRA's same phase; the allocator's
    as a share of PEFT LoRA's whole step), then its ops (+ Triton launches)."""
    lora = results["peft_lora"]
    eager = [p for p in results if results[p]["phases"]]
    headers = ["phase"] + [f"{SHORT[p]} ms" for p in eager] + [f"{SHORT[p]} ops (+ launches)" for p in eager]
    rows = []
    for phase in PHASES:
        times, counts = [], []
        for p in eager:
            t = results[p]["phases"].get(phase)
            if t is None:
                times.append("—")
                counts.append("—")
                continue
            base = lora["phases"].get(phase)
            if p == "peft_lora":
                times.append(f"{t:.2f}")
            elif base is not None:
                times.append(f"{t:.2f} ({t / base:.2f}×)")
            else:
                times.append(f"{t:.2f} ({100 * t / lora['host']:.0f} % of LoRA's step)")
            ops, launches = results[p]["counts"][phase]
            counts.append(f"{ops}" + (f" (+{launches})" if launches else ""))
        rows.append([PHASE_LABELS.get(phase, phase)] + times + counts)
    return _md(headers, rows)


def module_cost_table(results: dict, modules: int) -> tuple[str, str]:
    """(the table of each adapter provider's forward and backward above the frozen model's, per adapted module,
    and a line on what the whole-step target leaves adalora-fast per module). All from best phase times."""
    floor = results["frozen_model"]["phases"]
    floor_ms = floor["forward"] + floor["backward"]

    def split(phases):  # (forward + backward above the floor, µs per module; the other phases, ms)
        above = 1e3 * (phases["forward"] + phases["backward"] - floor_ms) / modules
        return above, sum(t for n, t in phases.items() if n not in ("forward", "backward"))

    rows = []
    for p in ADAPTERS:
        ph = results[p]["phases"]
        fwd, bwd = (1e3 * (ph[n] - floor[n]) / modules for n in ("forward", "backward"))
        above, rest = split(ph)
        rows.append([LABELS[p], f"{fwd:.1f}", f"{bwd:.1f}", f"{above:.1f}", f"{rest:.2f}"])
    table = _md(("provider", "forward µs / module", "backward µs / module", "forward + backward µs / module",
                 "optimizer + allocator + zero_grad ms"), rows)  # fmt: skip
    lora = results["peft_lora"]["phases"]
    now, fast_rest = split(results["adalora_fast"]["phases"])
    budget = 0.85 * sum(lora.values()) - floor_ms - fast_rest
    line = (f"A whole step at 0.85× PEFT LoRA's (sum of best phases: {0.85 * sum(lora.values()):.2f} ms), with "
            f"adalora-fast's other phases as measured ({fast_rest:.2f} ms) and the frozen model's forward and "
            f"backward ({floor_ms:.2f} ms), leaves its adapted modules and penalty "
            f"{1e3 * budget / modules:.1f} µs per module for forward + backward; they take {now:.1f}.")  # fmt: skip
    return table, line


def _linear_subclass():
    import torch.nn as nn

    class LinearSubclass(nn.Linear):
        """An nn.Linear subclass (as torchao's or an fp8 Linear is): the patched layer lets it compute its own
        output and adds the adapter's term onto it (svd_adapter_add), the path of every quantized base."""

    return LinearSubclass


def layer_table(args, device, dtype) -> tuple[str, dict]:
    """µs per forward and forward+backward of one adapted layer at the model's shapes (host_overhead.py's
    timing: thread CPU time, or wall time on a GPU): the frozen base, PEFT's layers, the patched PEFT layer and
    FastSVDLinear."""
    import torch

    from adalora_fast.benchmarking import build_layer
    from adalora_fast.integrations.peft import fast_layer_class

    h = args.hidden

    def build(provider):
        return build_layer(provider, h, h, 12, dropout=args.dropout, dtype=dtype, device=device)

    patched = build("peft_svdlinear")
    patched.__class__ = fast_layer_class()  # what patch_peft does to each of PEFT's SVDLinear layers
    over_any_base = build("peft_svdlinear")
    over_any_base.__class__ = fast_layer_class()
    over_any_base.get_base_layer().__class__ = _linear_subclass()
    layers = {
        "nn.Linear (frozen: the floor)": build("frozen_linear"),
        "PEFT LoRA Linear (r 8)": build("peft_lora"),
        "PEFT AdaLoRA SVDLinear": build("peft_svdlinear"),
        "FastPeftSVDLinear (the patched PEFT layer)": patched,
        "FastPeftSVDLinear, adapter onto the base's output (as over a quantized base)": over_any_base,
        "FastSVDLinear": build("adalora_fast"),
    }
    x = torch.randn(args.batch, args.seq, h, device=device, dtype=dtype, requires_grad=True)
    cases = {}
    for name, layer in layers.items():
        fwd, fwd_bwd = host_overhead.step_fns(layer, x)
        cases[(name, "fwd")], cases[(name, "fwd+bwd")] = (fwd, None), (fwd_bwd, None)
    # (as many blocks as host_overhead.py's: six layers interleaved, whose ratios a noisy host moves by ±5 %
    # over fewer)
    t = host_overhead.measure(cases, args.layer_number, args.repeats * 2 if args.quick else max(25, args.repeats * 2))
    fast = t[("FastSVDLinear", "fwd+bwd")]
    rows = [(name, f"{t[(name, 'fwd')]:.1f}", f"{t[(name, 'fwd+bwd')]:.1f}", f"{t[(name, 'fwd+bwd')] / fast:.2f}")
            for name in layers]  # fmt: skip
    clock = "wall" if GPU else "host"
    return _md(("layer", f"fwd (no_grad) {clock} µs", f"fwd+bwd {clock} µs", "fwd+bwd / FastSVDLinear"), rows), t


def targets_table(results: dict, layer_times: dict) -> str:
    lora, fast = results["peft_lora"], results["adalora_fast"]
    patched = layer_times[("FastPeftSVDLinear (the patched PEFT layer)", "fwd+bwd")]
    fsvd = layer_times[("FastSVDLinear", "fwd+bwd")]
    checks = [
        ("whole step ≤ 0.85× PEFT LoRA's", fast["host"] / lora["host"], 0.85, "×"),
        ("forward + penalty ≤ PEFT LoRA's forward", fast["phases"]["forward"] / lora["phases"]["forward"], 1.0, "×"),
        ("allocator ≤ 10 % of PEFT LoRA's step", 100 * fast["phases"]["allocator"] / lora["host"], 10.0, " %"),
        ("patched PEFT layer ≤ 1.10× FastSVDLinear (fwd+bwd)", patched / fsvd, 1.10, "×"),
    ]
    rows = [(what, f"{value:.2f}{unit}", "met" if value <= limit else "not met") for what, value, limit, unit in checks]
    return _md(("target", "adalora-fast", ""), rows)


# ------------------------------------------------------------------------------------------------------------
# Where the time goes (cProfile)
# ------------------------------------------------------------------------------------------------------------


def _where(key) -> str:
    file, line, name = key
    if file == "~":
        return name
    parts = os.path.normpath(file).split(os.sep)
    for root in ("adalora_fast", "kernels", "peft", "transformers", "torch", "triton"):
        if root in parts:
            file = "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
            break
    else:
        file = os.path.basename(file)
    return f"{file}:{line} {name}"


def profile_phases(step, unprofiled: dict[str, float], steps: int, top: int) -> str:
    """Each phase's functions by own time (cProfile), as µs per step: each function's share of the profiled
    phase times the phase's unprofiled best time (cProfile's per-call cost inflates Python calls more than C
    ones, so the µs are estimates; the call counts are exact)."""
    import cProfile
    import pstats

    profiles = {name: cProfile.Profile() for name in step.phases()}
    gc.disable()
    try:
        for _ in range(steps):
            for name, fn in step.phases().items():
                profiles[name].enable()
                fn()
                profiles[name].disable()
            _sync()
    finally:
        gc.enable()
    out = []
    for name, prof in profiles.items():
        stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
        total = sum(v[2] for v in stats.values())
        us = unprofiled[name] * 1e3
        by_own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
        by_cum = sorted(stats.items(), key=lambda kv: -kv[1][3])
        by_cum = [kv for kv in by_cum if kv[0][0] != "~"][:top]  # (Python functions: where the calls come from)
        own_rows = [(_where(k)[:90], f"{v[1] / steps:g}", f"{us * v[2] / total:.0f}") for k, v in by_own]
        cum_rows = [(_where(k)[:90], f"{v[1] / steps:g}", f"{us * v[3] / total:.0f}") for k, v in by_cum]
        out.append(f"**{PHASE_LABELS.get(name, name)}**: {us:.0f} µs per step unprofiled\n\n"
                   + _md(("function (own time)", "calls / step", "≈ µs / step"), own_rows) + "\n\n"
                   + _md(("function (inclusive time)", "calls / step", "≈ µs / step"), cum_rows))  # fmt: skip
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    global GPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, few steps")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (7 adapted modules each; default 8)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2 × hidden")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per provider (default 15)")
    parser.add_argument("--layer-number", type=int, default=None, help="calls per timed block of the layer table")
    parser.add_argument("--optimizer", choices=("foreach", "fused"), default="foreach",
                        help="AdamW's implementation (fused: the Trainer's default, adamw_torch_fused)")
    parser.add_argument("--profile", action="store_true", help="cProfile each phase (PEFT LoRA and adalora-fast)")
    parser.add_argument("--profile-top", type=int, default=18)
    parser.add_argument("--cpu", action="store_true", help="the fake-driver measurement even where a GPU is present")
    parser.add_argument("--python-launcher", action="store_true",
                        help="fake driver: a Python stand-in for Triton's C launcher (no stub libcuda, no C compiler)")
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 8)
    args.steps = args.steps or (2 if args.quick else 5)
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.layer_number = args.layer_number or (5 if args.quick else 40)

    import torch  # (torch first: is there a GPU?)

    GPU = host_overhead.GPU = torch.cuda.is_available() and not args.cpu
    # the stub libcuda must not meet a real CUDA driver in one process
    fake = _prepare_process(GPU, native=not (args.python_launcher or torch.cuda.is_available()))
    if not GPU:
        _penalty_on_extension()
    import peft
    import transformers
    import triton

    from adalora_fast import dispatch
    from bench_common import LLAMA_TARGETS

    device, dtype = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)
    if GPU:
        where = f"{torch.cuda.get_device_name(0)}; host time: thread CPU time, with wall and device time per step"
    else:
        launcher = "Triton's C launcher on a stub libcuda" if fake.native else "a Python stand-in launcher"
        where = f"CPU, fake CUDA driver ({launcher}, cuLaunchKernelEx a no-op), one thread, thread CPU time"
    providers = PROVIDERS + (("peft_lora_graph", "adalora_fast_graph") if GPU else ())
    print(f"# Host cost of a training step ({where})\n")
    print(f"`python benchmarks/step_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    shape = llama_shape(args)
    print(f"torch {torch.__version__}, triton {triton.__version__}, peft {peft.__version__}, transformers "
          f"{transformers.__version__}; Llama {args.layers} layers × {len(LLAMA_TARGETS)} adapted modules = "
          f"{len(LLAMA_TARGETS) * args.layers}, hidden {args.hidden}, intermediate {shape['intermediate_size']}, "
          f"vocab {args.vocab}, {args.batch}×{args.seq} tokens, {str(dtype)[6:]}, dropout {args.dropout}, "
          f"AdamW {args.optimizer}; "
          f"whole step: best of {args.repeats} blocks of {args.steps} steps; phases: best of "
          f"{args.repeats * args.steps} steps\n")  # fmt: skip
    dispatch.reset_backend_calls()
    results = measure_steps(args, device, dtype, providers)
    print("## Per step\n")
    print(step_table(results))
    print("\n## Per phase (ms; ops that reach the dispatcher, + Triton launches)\n")
    print(phase_table(results))
    modules = len(LLAMA_TARGETS) * args.layers
    table, bound = module_cost_table(results, modules)
    print(f"\n## Per adapted module, above the frozen model (the layers and, for AdaLoRA, the penalty; {modules} "
          "modules; best phases)\n")
    print(table)
    print(f"\n{bound}")
    if "penalty_op" in results["adalora_fast"]:
        fwd, bwd = results["adalora_fast"]["penalty_op"]
        print(f"\nOf adalora-fast's forward and backward, the penalty op's own CPU loops (device work on a GPU): "
              f"{fwd:.2f} and {bwd:.2f} ms.")  # fmt: skip
    h = args.hidden
    print(f"\n## One adapted layer, {args.batch}×{args.seq} tokens × {h}→{h}, r 12 (8 for LoRA)\n")
    table, layer_times = layer_table(args, device, dtype)
    print(table)
    print("\n## Targets\n")
    print(targets_table(results, layer_times))
    calls = dispatch.backend_calls()
    print(f"\nadapter and penalty backends in this run: {calls}")
    if fake is not None:
        from adalora_fast.kernels.launch import launch_counts

        print(f"fake driver: {fake.launch_count()} launches; counted by path: {launch_counts()}")
    if calls["svd_adapter"].get("reference") or calls["orth_penalty"].get("reference"):
        raise SystemExit("adalora-fast ran an op on its reference: the step measured is not the kernels' step")
    if args.profile:
        unprofiled = {p: results[p]["phases"] for p in ("peft_lora", "adalora_fast")}
        for p in unprofiled:
            _, step, _ = build(p, args, device, dtype)
            print(f"\n## Where {LABELS[p]}'s host time goes, phase by phase (cProfile, {args.steps * 4} steps)\n")
            print(profile_phases(step, unprofiled[p], args.steps * 4, args.profile_top))


if __name__ == "__main__":
    main()
