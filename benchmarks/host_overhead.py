"""Host overhead of one adapted layer call: where the microseconds go, beside nn.Linear and PEFT's layers.

    python benchmarks/host_overhead.py [--quick] [--tokens 64] [--in-features 64] [--out-features 64] [--rank 12]

Prints markdown tables (paste them into a note):

1. per layer call, µs per forward (no_grad) and per forward+backward for the frozen ``nn.Linear``, PEFT's
   LoRA ``Linear``, PEFT's AdaLoRA ``SVDLinear``, and ``FastSVDLinear`` on the kernel path twice: as the
   package launches (each kernel through ``adalora_fast.kernels.launch.CachedLauncher``) and with that
   launcher's direct path turned off (every launch Triton's whole ``kernel[grid](...)`` path);
2. the fast layer's call split into its levels (module, functional, ``dispatch.svd_adapter_linear``,
   ``svd_linear_triton``, ``autograd.Function.apply``, the launchers, the Triton launches themselves);
3. what single steps cost: allocations, grid lambdas, ``dropout_seed``, ``unit_mask``, ``Function.apply``,
   one Triton launch by each path, and a rank-r ``addmm`` against a launch.

Without a GPU the kernels go through Triton's real compiled launch path on the fake CUDA driver
(``tests/tooling/fake_driver.py``), by default with Triton's own C launcher compiled against the fake
driver's stub libcuda: everything down to ``cuLaunchKernelEx`` is measured and only that call is a no-op
(``--python-launcher``: the launcher's C call is left out too). The aten ops run on CPU tensors, on one
thread (small shapes, so their compute stays small). With a GPU the
same tables are measured on it (bf16), and a torch.profiler table gives each op's CPU self time per call.

Every figure is the minimum over repeats of the mean of a block of calls, all providers interleaved in one
run; without a GPU the clock is this thread's CPU time (what the host spends on the call, whatever else the
machine runs), with one the wall time. Ratios are meaningful only between providers of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import time

# The fake CUDA driver is test tooling (tests/tooling/fake_driver.py), not part of the package.
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

GPU = None  # decided in main(), before adalora_fast is imported


def _prepare_process(gpu: bool, native: bool = True):
    """Without a GPU: Triton's compiled path (no interpreter) on the fake driver, kernels forced on CPU tensors;
    ``native``: Triton's own C launcher on the fake driver's stub libcuda (else the Python stand-in)."""
    if gpu:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("host_overhead measures Triton's compiled launch path: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["ADALORA_FAST_BACKEND"] = "triton"
    import torch

    # One intra-op thread: the CPU aten ops then cost their dispatch and their (small) compute, not the wait
    # for a second thread of a loaded machine.
    torch.set_num_threads(1)
    from tooling import fake_driver

    fake = fake_driver.activate(record=False, bench="first", native=native)
    from adalora_fast import dispatch

    dispatch.triton_interpreter_enabled = lambda: True  # lets dispatch send CPU tensors to the kernels
    return fake


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def _sync():
    import torch

    if GPU:
        torch.cuda.synchronize()


def _block_us(fn, number: int) -> float:
    _sync()
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a block is noise, not the call's cost
    clock = time.perf_counter_ns if GPU else time.thread_time_ns
    try:
        t0 = clock()
        for _ in range(number):
            fn()
        _sync()
        return (clock() - t0) / number / 1e3
    finally:
        if gc_was_on:
            gc.enable()


def measure(cases: dict, number: int, repeats: int, warmup: int = 3) -> dict[str, float]:
    """{name: µs per call}: the minimum over repeats of a block of ``number`` calls, cases interleaved.

    ``cases``: name -> (fn, context manager factory or None), the context entered around each block."""
    for fn, ctx in cases.values():
        with ctx() if ctx else contextlib.nullcontext():
            for _ in range(warmup):
                fn()
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, (fn, ctx) in cases.items():
            with ctx() if ctx else contextlib.nullcontext():
                best[name] = min(best[name], _block_us(fn, number))
    return best


# ------------------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------------------

_PLAIN_BY_CHOICE = 0  # kernel[grid] launches made on purpose, inside plain_launches()


@contextlib.contextmanager
def plain_launches():
    """Every kernel launched as ``kernel[grid](...)`` through Triton's whole path (CachedLauncher's direct
    path off): the package's launches before CachedLauncher, for comparison."""
    global _PLAIN_BY_CHOICE
    from adalora_fast.kernels.launch import direct_launch_enabled, launch_counts, set_direct_launch

    was = direct_launch_enabled()
    before = launch_counts()["plain"]
    set_direct_launch(False)
    try:
        yield
    finally:
        set_direct_launch(was)
        _PLAIN_BY_CHOICE += launch_counts()["plain"] - before


def peft_lora_linear(base, r: int, lora_alpha: int, dropout: float):
    """PEFT's LoRA ``Linear`` around ``base``, as the layer benchmark builds it."""
    from adalora_fast.benchmarking import peft_lora_linear as build

    return build(base, r, lora_alpha, dropout)


def build_providers(tokens, in_f, out_f, r, dtype, dropout, device):
    import torch

    from adalora_fast.benchmarking import build_layer

    layers = {
        "nn.Linear (frozen)": build_layer("frozen_linear", in_f, out_f, r, dtype=dtype, device=device),
        "PEFT LoRA Linear": None,
        "PEFT AdaLoRA SVDLinear": build_layer("peft_svdlinear", in_f, out_f, r, dropout=dropout, dtype=dtype,
                                              device=device),  # fmt: skip
        "FastSVDLinear, kernel[grid]": build_layer("adalora_fast", in_f, out_f, r, dropout=dropout, dtype=dtype,
                                                   device=device),  # fmt: skip
    }
    base = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    layers["PEFT LoRA Linear"] = peft_lora_linear(base, r, 16, dropout).to(device=device, dtype=dtype)
    layers["FastSVDLinear, CachedLauncher"] = layers["FastSVDLinear, kernel[grid]"]
    contexts = {"FastSVDLinear, kernel[grid]": plain_launches}
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    return layers, contexts, x


def step_fns(layer, x):
    """(forward under no_grad, forward+backward with the trainable grads and x.grad set to None after)."""
    import torch

    trainable = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer(x).backward(grad_out)
        for p in trainable:
            p.grad = None
        x.grad = None

    return forward, forward_backward


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


def _md(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def provider_table(args, dtype_names, dropouts, device):
    import torch

    rows = []
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for p in dropouts:
            layers, contexts, x = build_providers(args.tokens, args.in_features, args.out_features, args.rank, dtype,
                                                  p, device)  # fmt: skip
            cases = {}
            for name, layer in layers.items():
                fwd, fwd_bwd = step_fns(layer, x)
                ctx = contexts.get(name)
                cases[(name, "fwd")] = (fwd, ctx)
                cases[(name, "fwd+bwd")] = (fwd_bwd, ctx)
            t = measure(cases, args.number, args.repeats)
            lora = t[("PEFT LoRA Linear", "fwd+bwd")]
            for name in layers:
                rows.append((name, dtype_name, p, f"{t[(name, 'fwd')]:.1f}", f"{t[(name, 'fwd+bwd')]:.1f}",
                             f"{t[(name, 'fwd+bwd')] / lora:.2f}"))  # fmt: skip
    return _md(("layer", "dtype", "dropout", "fwd µs", "fwd+bwd µs", "fwd+bwd / PEFT LoRA"), rows)


def _fast_layer_parts(args, dtype, dropout, device):
    """Closures calling the fast layer's forward at each level, and its backward's parts."""
    import torch
    import torch.nn.functional as F

    from adalora_fast import dispatch, functional
    from adalora_fast.adapter import SVDAdapter
    from adalora_fast.benchmarking import build_layer
    from adalora_fast.kernels import svd_adapter_op as op

    layer = build_layer("adalora_fast", args.in_features, args.out_features, args.rank, dropout=dropout, dtype=dtype,
                        device=device)  # fmt: skip
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    W, b, A, E, B, mask, ranknum = layer.weight, layer.bias, layer.lora_A, layer.lora_E, layer.lora_B, \
        layer.triplet_mask, layer.ranknum  # fmt: skip
    s = float(layer.scaling)
    seed = op.dropout_seed(dropout, x.device)
    x2d = x.detach()
    adapter = SVDAdapter(A, E, B, mask, s, ranknum, False, dropout)
    y = F.linear(x2d, W, b)
    h = op.svd_adapter_forward(x2d, adapter, seed, y)
    dy = torch.randn_like(y)
    trainable = [A, E, B]

    def clear():
        for p in trainable:
            p.grad = None
        x.grad = None

    fwd = {
        "module: layer(x)": lambda: layer(x),
        "functional.svd_linear": lambda: functional.svd_linear(
            x, W, b, A, E, B, mask, layer.scaling, ranknum, dropout_p=dropout, training=True),
        "dispatch.svd_adapter_linear": lambda: dispatch.svd_adapter_linear(x, W, b, adapter),
        "svd_linear_triton": lambda: op.svd_linear_triton(x, W, b, adapter),
        "SVDLinearFunction.apply": lambda: op.SVDLinearFunction.apply(x, W, b, A, E, B, adapter, None, None),
        "svd_adapter_forward onto F.linear (F.linear + 2 launches)": lambda: op.svd_adapter_forward(
            x2d, adapter, seed, F.linear(x2d, W, b)),
        "svd_adapter_forward onto zeros (zeros + 2 launches)": lambda: op.svd_adapter_forward(
            x2d, adapter, seed, torch.zeros_like(y)),
    }

    def module_fwd_bwd():
        layer(x).backward(dy)
        clear()

    def function_fwd_bwd():
        op.SVDLinearFunction.apply(x, W, b, A, E, B, adapter, None, None).backward(dy)
        clear()

    bwd = {
        "module: layer(x).backward()": module_fwd_bwd,
        "SVDLinearFunction.apply(...).backward()": function_fwd_bwd,
        "svd_adapter_backward onto dY·W0 (mm + 3 launches)": lambda: op.svd_adapter_backward(
            dy, x2d, adapter, h, seed, dy.mm(W)),
        "svd_adapter_backward onto zeros (zeros + 3 launches)": lambda: op.svd_adapter_backward(
            dy, x2d, adapter, h, seed, torch.zeros_like(x2d)),
    }
    return fwd, bwd


def breakdown_table(args, dtype, dropout, device):
    fwd, bwd = _fast_layer_parts(args, dtype, dropout, device)
    rows = []
    for label, ctx in (("kernel[grid]", plain_launches), ("CachedLauncher", None)):
        cases = {(name, label): (fn, ctx) for name, fn in {**fwd, **bwd}.items()}
        t = measure(cases, args.number, args.repeats)
        for name in {**fwd, **bwd}:
            rows.append((name, label, f"{t[(name, label)]:.1f}"))
    merged = {}
    for name, label, us in rows:
        merged.setdefault(name, {})[label] = us
    return _md(("level (each includes the ones below it)", "µs, kernel[grid]", "µs, CachedLauncher"),
               [(name, v["kernel[grid]"], v["CachedLauncher"]) for name, v in merged.items()])  # fmt: skip


def _pointer_kernels():
    """Two trivial kernels, with 4 and with 20 pointer arguments: what each pointer argument costs a launch."""
    import triton
    import triton.language as tl

    @triton.jit
    def four_pointers(P0, P1, P2, P3, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(P0 + i, tl.load(P1 + i, mask=i < N), mask=i < N)

    @triton.jit
    def twenty_pointers(P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12, P13, P14, P15, P16, P17, P18, P19, N,
                        BLOCK: tl.constexpr):  # fmt: skip
        i = tl.arange(0, BLOCK)
        tl.store(P0 + i, tl.load(P1 + i, mask=i < N), mask=i < N)

    return four_pointers, twenty_pointers


def steps_table(args, dtype, dropout, device):
    """µs of single steps of a layer call."""
    import torch
    import triton

    from adalora_fast import dispatch
    from adalora_fast.adapter import SVDAdapter, check_svd_linear_input
    from adalora_fast.kernels import svd_adapter_op as op
    from adalora_fast.kernels.launch import CachedLauncher, current_stream
    from adalora_fast.kernels.precision import dot_settings
    from adalora_fast.kernels.tiles import cdiv, rank_pad

    n, k, out, r = args.tokens, args.in_features, args.out_features, args.rank
    r_pad = rank_pad(r)
    dev = torch.device(device)
    x = torch.randn(n, k, device=dev, dtype=dtype)
    A = torch.randn(r, k, device=dev, dtype=dtype)
    E = torch.randn(r, 1, device=dev, dtype=dtype)
    B = torch.randn(out, r, device=dev, dtype=dtype)
    mask = torch.ones(r, device=dev, dtype=dtype)
    ranknum = torch.full((1,), float(r), device=dev, dtype=dtype)
    W = torch.randn(out, k, device=dev, dtype=dtype)
    seed = op.dropout_seed(dropout, dev, 1234)
    h = torch.empty((n, r_pad), device=dev, dtype=torch.float32)
    y = torch.empty((n, out), device=dev, dtype=dtype)
    # The forward's two launches as the op makes them (arguments and constexprs), each measured by every path.
    shrink, expand = op.forward_launches(x, SVDAdapter(A, E, B, mask, 2.0, ranknum, False, dropout), seed, y)
    shrink_kernel, grid = shrink.launcher.kernel, shrink.grid  # the autotuned kernel

    shrink_cached = CachedLauncher(shrink_kernel)
    expand_cached = CachedLauncher(expand.launcher.kernel)
    compiled = shrink_kernel[grid](*shrink.args, **shrink.constexprs)  # autotune + compile
    config = shrink_kernel.best_config.all_kwargs()
    fixed_grid = (*grid(config), 1, 1)[:3]
    launcher, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    # the constexprs in signature order, after the positional arguments (what the compiled launcher takes)
    tail = tuple({**shrink.constexprs, **config}[p.name] for p in shrink_kernel.fn.params if p.is_constexpr)
    shrink_cached(grid, *shrink.args, **shrink.constexprs)
    expand_cached(expand.grid, *expand.args, **expand.constexprs)
    shrink_bound = shrink_cached.bind(grid, *shrink.args, **shrink.constexprs)
    expand_bound = expand_cached.bind(expand.grid, *expand.args, **expand.constexprs)
    u = torch.randn(n, r, device=dev, dtype=dtype)
    lam = torch.randn(r, device=dev, dtype=dtype)
    h_r = h[:, :r].to(dtype)

    cases = {
        "torch.empty((N, R_PAD)) (a fwd+bwd makes 5: h, the workspace, 3 gradients)": lambda: torch.empty((n, r_pad), device=dev,
                                                                                       dtype=torch.float32),
        "grid lambda: made and called once": lambda: (lambda meta: (cdiv(n, meta["BLOCK_M"]),))({"BLOCK_M": 64}),
        "float(scaling)": lambda: float(16),
        "dot_settings(dtype)": lambda: dot_settings(dtype),
        f"dropout_seed(p={dropout})": lambda: op.dropout_seed(dropout, dev),
        "dropout_seed(p=0)": lambda: op.dropout_seed(0.0, dev),
        "unit_mask(r, device, dtype)": lambda: op.unit_mask(r, dev, dtype),
        "check_svd_linear_input": lambda: check_svd_linear_input(x, W, k),
        "dispatch.adapter_backend": lambda: dispatch.adapter_backend(x, A, E, B),
        "shrink launch: autotuned kernel[grid](...)": lambda: shrink_kernel[grid](*shrink.args, **shrink.constexprs),
        "shrink launch: JITFunction[grid](...) with the config": lambda: shrink_kernel.fn[grid](
            *shrink.args, **shrink.constexprs, **config),
        "shrink launch: CachedLauncher(grid, ...)": lambda: shrink_cached(grid, *shrink.args, **shrink.constexprs),
        "shrink launch: CachedLauncher, tuple grid": lambda: shrink_cached(fixed_grid, *shrink.args,
                                                                           **shrink.constexprs),
        "  of which the key (CachedLauncher.key)": lambda: shrink_cached.key(*shrink.args, **shrink.constexprs),
        "shrink launch: the compiled kernel's launcher alone": lambda: launcher(
            *fixed_grid, 0, function, packed, None, None, None, *shrink.args, *tail),
        "shrink launch: BoundLaunch (a plan's replay)": lambda: shrink_bound(current_stream(), shrink.args),
        "expand launch: CachedLauncher(grid, ...)": lambda: expand_cached(expand.grid, *expand.args,
                                                                          **expand.constexprs),
        "expand launch: BoundLaunch (a plan's replay)": lambda: expand_bound(current_stream(), expand.args),
        "expand as aten: y.addmm_(u, Bᵀ) (rank r)": lambda: y.addmm_(u, B.t()),
        "expand as aten: torch.addmm(y, h[:, :r]·λ, Bᵀ) (mul + addmm)": lambda: torch.addmm(y, h_r * lam, B.t()),
        "aten: F.linear(x, W) (the base GEMM)": lambda: torch.nn.functional.linear(x, W),
    }
    # what one more pointer argument costs: Triton's launcher (C: data_ptr(), cuPointerGetAttribute) and the key
    four, twenty = _pointer_kernels()
    bufs = [torch.empty(64, device=dev) for _ in range(20)]
    for name, kernel, n_ptr in (("4 pointers", four, 4), ("20 pointers", twenty, 20)):
        ptr_args = (*bufs[:n_ptr], 64)
        ck = kernel[(1,)](*ptr_args, BLOCK=64)
        cached = CachedLauncher(kernel)
        cached((1,), *ptr_args, BLOCK=64)
        cases[f"kernel with {name}: JITFunction[grid](...)"] = functools.partial(
            lambda k, a: k[(1,)](*a, BLOCK=64), kernel, ptr_args)
        cases[f"kernel with {name}: CachedLauncher"] = functools.partial(lambda c, a: c((1,), *a, BLOCK=64), cached,
                                                                          ptr_args)
        cases[f"kernel with {name}: its launcher alone"] = functools.partial(
            lambda r, f, m, a: r(1, 1, 1, 0, f, m, None, None, None, *a, 64), ck.run, ck.function,
            ck.packed_metadata, ptr_args)
    if not GPU:
        from tooling import fake_driver

        if not fake_driver.active().native:
            fake_launch = fake_driver.active().launcher_cls(compiled.src, compiled.metadata)
            cases["  the Python stand-in launcher (in every launch above)"] = lambda: fake_launch(
                *fixed_grid, 0, function, packed, None, None, None, *shrink.args, *tail)
    t = measure({name: (fn, None) for name, fn in cases.items()}, args.number * 5, args.repeats)

    # the autograd path, whole forward and forward+backward
    xg = x.clone().requires_grad_(True)
    Ag, Eg, Bg = (p.clone().requires_grad_(True) for p in (A, E, B))
    dy = torch.randn(n, out, device=dev, dtype=dtype)
    adapter = SVDAdapter(Ag, Eg, Bg, mask, 16.0, ranknum, False, dropout)

    def via_function():
        return op.SVDLinearFunction.apply(xg, W, None, Ag, Eg, Bg, adapter, None, None)

    def fwd_bwd():
        via_function().backward(dy)
        xg.grad = Ag.grad = Eg.grad = Bg.grad = None

    class EmptyFunction(torch.autograd.Function):
        """autograd's own cost: the op's inputs, saved tensors and gradients, and no work."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, adapter, seed, emission):
            ctx.save_for_backward(x, weight, lora_A, lora_E, lora_B, x)
            return torch.empty(n, out, device=dev, dtype=dtype)

        @staticmethod
        def backward(ctx, dy):
            ctx.saved_tensors  # noqa: B018 - unpacked, as the op's backward does
            return (torch.empty_like(xg), None, None, torch.empty_like(Ag), torch.empty_like(Eg),
                    torch.empty_like(Bg), None, None, None)  # fmt: skip

    def empty_fwd_bwd():
        EmptyFunction.apply(xg, W, None, Ag, Eg, Bg, adapter, None, None).backward(dy)
        xg.grad = Ag.grad = Eg.grad = Bg.grad = None

    t2 = measure({"SVDLinearFunction.apply: fwd": (via_function, None),
                  "SVDLinearFunction.apply: fwd+bwd": (fwd_bwd, None),
                  "an autograd.Function with the op's inputs, saved tensors and gradients, no work: fwd+bwd": (
                      empty_fwd_bwd, None)}, args.number, args.repeats)  # fmt: skip
    rows = [(name, f"{us:.2f}") for name, us in {**t, **t2}.items()]
    _ = triton
    return _md(("step", "µs per call"), rows)


def cprofile_table(args, dtype, dropout, device, top: int = 22):
    """Where a fast-layer forward+backward spends its host time, by function (cProfile's own time, as shares of
    the profiled total: system noise hits every function alike), with both launch paths."""
    import cProfile
    import pstats

    from adalora_fast.benchmarking import build_layer

    layer = build_layer("adalora_fast", args.in_features, args.out_features, args.rank, dropout=dropout, dtype=dtype,
                        device=device)  # fmt: skip
    import torch

    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    _, fwd_bwd = step_fns(layer, x)
    steps = max(20, args.number * 3)
    out = []
    for label, ctx in (("kernel[grid]", plain_launches), ("CachedLauncher", contextlib.nullcontext)):
        with ctx():
            for _ in range(5):
                fwd_bwd()
            unprofiled = measure({"f": (fwd_bwd, None)}, args.number, max(3, args.repeats // 3))["f"]
            gc.disable()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                fwd_bwd()
            _sync()
            prof.disable()
            gc.enable()
        stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
        total = sum(v[2] for v in stats.values())
        rows = []
        for (file, line, name), (_, calls, tottime, _, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
            short = os.path.join(os.path.basename(os.path.dirname(file)), os.path.basename(file))
            where = name if file == "~" else f"{short}:{line} {name}"
            rows.append((where[:70], f"{calls / steps:g}", f"{100 * tottime / total:.1f}",
                         f"{unprofiled * tottime / total:.1f}"))  # fmt: skip
        out.append(f"**{label}**: {unprofiled:.0f} µs per forward+backward unprofiled\n\n"
                   + _md(("function (own time)", "calls", "% of time", "≈ µs"), rows))  # fmt: skip
    return "\n\n".join(out)


def profile_table(args, dtype, dropout, device):
    """GPU only: each op's CPU self time per call over forward+backward steps, per provider."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    layers, contexts, x = build_providers(args.tokens, args.in_features, args.out_features, args.rank, dtype,
                                          dropout, device)  # fmt: skip
    out = []
    steps = 20
    for name in ("PEFT LoRA Linear", "FastSVDLinear, kernel[grid]", "FastSVDLinear, CachedLauncher"):
        _, fwd_bwd = step_fns(layers[name], x)
        ctx = contexts.get(name)
        with ctx() if ctx else contextlib.nullcontext():
            for _ in range(5):
                fwd_bwd()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fwd_bwd()
                torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        rows = [(e.key[:60], e.count // steps, f"{e.self_cpu_time_total / steps:.1f}") for e in events]
        out.append(f"**{name}** (per fwd+bwd, {steps} steps)\n\n" + _md(("op", "calls", "CPU self µs"), rows))
    return "\n\n".join(out)


def main(argv=None) -> None:
    global GPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one dtype, dropout 0 and 0.1, few repeats (CI)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--in-features", type=int, default=64)
    parser.add_argument("--out-features", type=int, default=64)
    parser.add_argument("--rank", type=int, default=12)
    parser.add_argument("--number", type=int, default=None, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per case (the minimum is kept)")
    parser.add_argument("--tables", default="layers,levels,functions,steps,profile",
                        help="which tables, of layers,levels,functions,steps,profile (profile: on a GPU only)")
    parser.add_argument("--cpu", action="store_true", help="the fake-driver measurement even where a GPU is present")
    parser.add_argument("--python-launcher", action="store_true",
                        help="fake driver: a Python stand-in for Triton's C launcher (no stub libcuda, no C compiler)")
    args = parser.parse_args(argv)
    args.number = args.number or (5 if args.quick else 40)
    args.repeats = args.repeats or (2 if args.quick else 25)
    tables = set(args.tables.split(","))

    import torch  # noqa: F401  (torch first: is there a GPU?)

    GPU = torch.cuda.is_available() and not args.cpu
    # the stub libcuda must not meet a real CUDA driver in one process
    fake = _prepare_process(GPU, native=not (args.python_launcher or torch.cuda.is_available()))
    import triton

    device = "cuda" if GPU else "cpu"
    dtype_names = ("bfloat16",) if GPU else (("float32",) if args.quick else ("float32", "float16"))
    dtype = getattr(torch, dtype_names[0])
    if GPU:
        where = torch.cuda.get_device_name(0)
    elif fake.native:
        where = "CPU, fake CUDA driver: Triton's C launcher on a stub libcuda, cuLaunchKernelEx a no-op"
    else:
        where = "CPU, fake CUDA driver: a Python stand-in for the C launch call"
    print(f"# Host overhead per layer call ({where})\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}; {args.tokens} tokens × "
          f"{args.in_features}→{args.out_features}, r {args.rank}; min over {args.repeats} blocks of "
          f"{args.number} calls\n")  # fmt: skip
    if "layers" in tables:
        print(provider_table(args, dtype_names, (0.0, 0.1), device))
    if "levels" in tables:
        print(f"\n## The fast layer's call, level by level ({dtype_names[0]}, dropout 0.1)\n")
        print(breakdown_table(args, dtype, 0.1, device))
    if "functions" in tables:
        print(f"\n## The fast layer's forward+backward by function, cProfile ({dtype_names[0]}, dropout 0.1)\n")
        print(cprofile_table(args, dtype, 0.1, device))
    if "steps" in tables:
        print(f"\n## Single steps ({dtype_names[0]}, dropout 0.1)\n")
        print(steps_table(args, dtype, 0.1, device))
    if GPU and "profile" in tables:
        print(f"\n## torch.profiler: CPU self time per op ({dtype_names[0]}, dropout 0.1)\n")
        print(profile_table(args, dtype, 0.1, device))
    from adalora_fast.kernels.launch import launch_counts

    counts = launch_counts()
    fell_back = counts["plain"] - _PLAIN_BY_CHOICE
    print(f"\nCachedLauncher calls in this run: {counts} ({_PLAIN_BY_CHOICE} plain on purpose, in the kernel[grid] "
          f"rows; plain elsewhere: {fell_back})")
    if fake is not None:
        print(f"fake driver: {fake.launch_count()} launches")
    if fell_back:
        raise SystemExit(f"{fell_back} CachedLauncher calls outside the kernel[grid] rows fell back to kernel[grid]: "
                         "the direct path was not measured")


if __name__ == "__main__":
    main()
