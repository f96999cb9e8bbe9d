"""Launch-path checks of CachedLauncher against Triton's own path, on the fake CUDA driver.

Run as a script in a process without TRITON_INTERPRET (the test suite's conftest turns the interpreter on
in-process): ``python tests/launch_checks.py [--native]`` prints one JSON line, {check name: null or the
failure}. ``--native``: Triton's own C launcher runs, compiled against the fake driver's stub libcuda (only
where no CUDA driver is loaded), and every launch must reach the stub's cuLaunchKernelEx with its grid.
tests/test_launch.py runs both; so can anyone, under any installed Triton.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("launch_checks needs Triton's compiled path: run it without TRITON_INTERPRET=1")

from tooling import fake_driver  # noqa: E402  (tests/tooling: run as a script, tests/ is on sys.path)

NATIVE = "--native" in sys.argv
FAKE = fake_driver.activate(record=True, bench="call", native=NATIVE)
_STUB_AT_CLEAR = [0]


def _clear():
    FAKE.clear_records()
    _STUB_AT_CLEAR[0] = fake_driver.stub_launches()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

from adalora_fast.kernels import launch  # noqa: E402
from adalora_fast.kernels.launch import CachedLauncher  # noqa: E402


@triton.jit
def _scale_add(X, Y, Z, N, stride, s, BLOCK: tl.constexpr, HAS_Y: tl.constexpr = True):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + i * stride, mask=i < N) * s
    if HAS_Y:
        v += tl.load(Y + i, mask=i < N)
    tl.store(Z + i, v, mask=i < N)


@triton.jit
def _accumulate(X, ACC, N, BLOCK: tl.constexpr):
    """ACC += X in place (so autotuning must restore ACC after each trial)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ACC + i, tl.load(ACC + i, mask=i < N) + tl.load(X + i, mask=i < N), mask=i < N)


_accumulate_tuned = triton.autotune(
    [triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
    key=["N"],
    restore_value=["ACC"],
)(_accumulate)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _same_launch(ref: fake_driver.LaunchRecord, got: fake_driver.LaunchRecord, hooks: bool) -> None:
    assert got.grid == ref.grid, (got.grid, ref.grid)
    if NATIVE:  # the direct call went through Triton's C launcher down to cuLaunchKernelEx
        reached = fake_driver.stub_launches() - _STUB_AT_CLEAR[0]
        assert reached == FAKE.launches, (reached, FAKE.launches)
        assert fake_driver.stub_last_grid() == got.grid
    assert got.stream == ref.stream
    assert got.function == ref.function
    assert got.packed_metadata == ref.packed_metadata
    if NATIVE:  # the C launch call's other arguments: the same objects
        assert got.c_extra is not None and len(got.c_extra) == len(ref.c_extra)
        for a, b in zip(got.c_extra, ref.c_extra):
            assert a is b or a == b, (got.c_extra, ref.c_extra)
    assert len(got.args) == len(ref.args), (len(got.args), len(ref.args))
    for i, (a, b) in enumerate(zip(got.args, ref.args)):
        assert _same_value(a, b), (i, a, b)
    if hooks:  # the same hooks, and launch metadata with the same content
        assert got.enter_hook is ref.enter_hook and got.exit_hook is ref.exit_hook
        assert got.launch_metadata.get() == ref.launch_metadata.get()
    else:  # Triton's chains are empty: the direct call passes no hook (calling an empty chain does nothing)
        assert not ref.enter_hook.calls and not ref.exit_hook.calls
        assert got.launch_metadata is None and got.enter_hook is None and got.exit_hook is None


def _launch_both(launcher, kernel, grid, args, kwargs, hooks=False):
    """(Triton's kernel and record, the launcher's first and second kernels and the direct call's record)."""
    _clear()
    ref_kernel = kernel[grid](*args, **kwargs)
    ref = FAKE.records[-1]
    before = launcher.counts()
    first = launcher(grid, *args, **kwargs)
    second = launcher(grid, *args, **kwargs)
    got = FAKE.records[-1]
    after = launcher.counts()
    _same_launch(ref, got, hooks)
    delta = {k: after[k] - before[k] for k in after}
    return ref_kernel, first, second, delta


def check_jit_same_launch_and_specialization_misses():
    n = 1008
    x, y, z = torch.randn(4096), torch.randn(4096), torch.empty(4096)
    launcher = CachedLauncher(_scale_add)
    grid = (triton.cdiv(n, 128),)
    variants = {
        "base": ((x, y, z, n, 16, 2.0), {"BLOCK": 128}),
        "stride is 1": ((x, y, z, n, 1, 2.0), {"BLOCK": 128}),
        "N not a multiple of 16": ((x, y, z, n + 1, 16, 2.0), {"BLOCK": 128}),
        "misaligned pointer": ((x[1:], y, z, n, 16, 2.0), {"BLOCK": 128}),
        "dtype": ((x.half(), y, z, n, 16, 2.0), {"BLOCK": 128}),
        "constexpr": ((x, y, z, n, 16, 2.0), {"BLOCK": 64}),
        "defaulted constexpr given": ((x, y, z, n, 16, 2.0), {"BLOCK": 128, "HAS_Y": False}),
        "int64 argument": ((x, y, z, n, 2**31 + 16, 2.0), {"BLOCK": 128}),
    }
    kernels = {}
    for name, (args, kwargs) in variants.items():
        ref_kernel, first, second, delta = _launch_both(launcher, _scale_add, grid, args, kwargs)
        assert first is ref_kernel and second is ref_kernel, name
        assert delta == {"direct": 1, "triton": 1, "plain": 0}, (name, delta)
        kernels[name] = ref_kernel
    # every variant specialises differently: Triton compiled a kernel for each, and the launcher missed on each
    assert len({id(k) for k in kernels.values()}) == len(variants)
    # the same specialization with other values hits the base entry
    x2, y2, z2 = torch.randn(8192), torch.randn(8192), torch.empty(8192)
    ref_kernel, first, second, delta = _launch_both(launcher, _scale_add, (64,), (x2, y2, z2, 2000, 32, 0.5),
                                                    {"BLOCK": 128})  # fmt: skip
    assert first is kernels["base"] and ref_kernel is kernels["base"]
    assert delta == {"direct": 2, "triton": 0, "plain": 0}, delta


def check_launch_hooks_and_metadata():
    x, y, z = torch.randn(1024), torch.randn(1024), torch.empty(1024)
    launcher = CachedLauncher(_scale_add)
    launcher((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)  # the entry
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _, first, second, delta = _launch_both(launcher, _scale_add, (8,), (x, y, z, 1024, 16, 2.0), {"BLOCK": 128},
                                               hooks=True)  # fmt: skip
        assert delta == {"direct": 2, "triton": 0, "plain": 0}, delta
        assert FAKE.records[-1].launch_metadata.get()["name"] == first.name
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def check_grid_callable_sees_the_meta_parameters():
    x, y, z = torch.randn(1024), torch.randn(1024), torch.empty(1024)
    launcher = CachedLauncher(_scale_add)
    seen = []

    def grid(meta):
        seen.append((meta["N"], meta["BLOCK"], meta["HAS_Y"], "stride" in meta, sorted(meta)))
        return (triton.cdiv(meta["N"], meta["BLOCK"]),)

    _launch_both(launcher, _scale_add, grid, (x, y, z, 1000, 16, 2.0), {"BLOCK": 64})
    # Triton's call, the launcher's first (Triton's path) and its direct call see the same meta-parameters
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2], seen
    assert seen[0][:4] == (1000, 64, True, True)


def check_autotuned_restore_value_tunes_once_per_key():
    tuned = _accumulate_tuned
    hook_calls = []
    pre, post = tuned.pre_hook, tuned.post_hook

    def counting_pre(kwargs, reset_only=False):
        hook_calls.append("pre")
        return pre(kwargs, reset_only=reset_only)

    def counting_post(kwargs, exception):
        hook_calls.append("post")
        return post(kwargs, exception)

    tuned.pre_hook, tuned.post_hook = counting_pre, counting_post
    try:
        launcher = CachedLauncher(tuned)
        x, acc = torch.randn(4096), torch.zeros(4096)

        def grid(meta):
            return (triton.cdiv(meta["N"], meta["BLOCK"]),)

        FAKE.benchmarked = 0
        first = launcher(grid, x, acc, 1024)  # tunes: each config benchmarked once, with the restore hooks
        assert FAKE.benchmarked == 2, FAKE.benchmarked
        assert launcher.counts() == {"direct": 0, "triton": 1, "plain": 0}
        tuned_hooks = len(hook_calls)
        assert tuned_hooks >= 4, hook_calls  # pre + post per trial (+ the reset after tuning)
        assert tuned.best_config.kwargs == {"BLOCK": 64}  # equal times: the first config
        for _ in range(5):
            assert launcher(grid, x, acc, 1024) is first
        assert launcher.counts() == {"direct": 5, "triton": 1, "plain": 0}
        assert FAKE.benchmarked == 2 and len(hook_calls) == tuned_hooks  # no tuning, no hook on direct calls
        # the same launch as Triton's (whose autotuner now hits its own cache)
        ref_kernel, a, b, delta = _launch_both(launcher, tuned, grid, (x, acc, 1024), {})
        assert ref_kernel is first and a is first and b is first
        assert FAKE.records[-1].grid == (16, 1, 1)  # the grid saw the tuned BLOCK
        assert FAKE.benchmarked == 2
        # another autotune key value: tuned again (once), then direct
        launcher(grid, x, acc, 2048)
        assert FAKE.benchmarked == 4
        launcher(grid, x, acc, 2048)
        assert launcher.counts()["triton"] == 2 and FAKE.benchmarked == 4
    finally:
        tuned.pre_hook, tuned.post_hook = pre, post


def check_switch_off_means_plain_launches():
    x, y, z = torch.randn(1024), torch.randn(1024), torch.empty(1024)
    launcher = CachedLauncher(_scale_add)
    launcher((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)
    launch.set_direct_launch(False)
    try:
        _clear()
        ref_kernel = _scale_add[(8,)](x, y, z, 1024, 16, 2.0, BLOCK=128)
        got = launcher((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)
        assert got is ref_kernel
        _same_launch(FAKE.records[0], FAKE.records[1], hooks=True)  # both Triton's: its hooks and metadata
        assert launcher.counts() == {"direct": 0, "triton": 1, "plain": 1}
    finally:
        launch.set_direct_launch(True)
    # keyword-passed tensors (not the launcher's form) go through Triton's path every time
    launcher((8,), x, y, z, 1024, 16, s=2.0, BLOCK=128)
    assert launcher.counts()["plain"] == 2


def check_direct_calls_go_to_the_lowest_launch_call():
    x, y, z = torch.randn(1024), torch.randn(1024), torch.empty(1024)
    launcher = CachedLauncher(_scale_add)
    launcher((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)
    (entry,) = launcher._entries.values()
    # native: Triton's own CudaLauncher, whose C launch function the direct call makes itself; the fake
    # driver's Python launcher is called as a launcher
    assert (entry.form != launch._VIA_LAUNCHER) == NATIVE, entry.form
    _clear()
    launcher((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)
    assert FAKE.launches == 1


def check_bound_launch_replays_the_same_launch():
    """A BoundLaunch replays, on new arguments of the same specialization, the launch kernel[grid] would make
    (grid callables resolved with the chosen config; autotuned kernels not tuned again), through the direct
    path; with a launch hook set, with Triton's metadata; with direct launches off, as the launcher's call."""
    tuned = _accumulate_tuned
    launcher = CachedLauncher(tuned)
    x, acc = torch.randn(4096), torch.zeros(4096)

    def grid(meta):
        return (triton.cdiv(meta["N"], meta["BLOCK"]),)

    bound = launcher.bind(grid, x, acc, 1024)
    assert bound.direct and (bound.g0, bound.g1, bound.g2) == (16, 1, 1)
    benchmarked = FAKE.benchmarked
    x2, acc2 = torch.randn(4096), torch.zeros(4096)
    _clear()
    ref_kernel = tuned[grid](x2, acc2, 1024)
    ref = FAKE.records[-1]
    before = launcher.counts()
    bound(launch.current_stream(), (x2, acc2, 1024))
    assert launcher.counts()["direct"] == before["direct"] + 1
    _same_launch(ref, FAKE.records[-1], hooks=False)
    assert FAKE.benchmarked == benchmarked and ref_kernel is bound.entry.kernel
    # the same for a plain JIT kernel with constexprs, and with a launch hook
    jit = CachedLauncher(_scale_add)
    x, y, z = torch.randn(1024), torch.randn(1024), torch.empty(1024)
    bound = jit.bind((8,), x, y, z, 1024, 16, 2.0, BLOCK=128)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _clear()
        _scale_add[(8,)](x, y, z, 1008, 16, 0.5, BLOCK=128)
        bound(launch.current_stream(), (x, y, z, 1008, 16, 0.5))
        _same_launch(FAKE.records[0], FAKE.records[1], hooks=True)
        assert len(seen) == (2 if NATIVE else 0)  # (the Python stand-in launcher records hooks, calls none)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    launch.set_direct_launch(False)
    try:
        before = jit.counts()
        bound(launch.current_stream(), (x, y, z, 1008, 16, 0.5))
        assert jit.counts()["plain"] == before["plain"] + 1
    finally:
        launch.set_direct_launch(True)


@contextlib.contextmanager
def _kernels_on_cpu_tensors():
    """The adapter's kernels for CPU tensors, which the fake driver launches (``ADALORA_FAST_BACKEND=triton``,
    with the dispatcher's interpreter condition met)."""
    from adalora_fast import dispatch

    os.environ["ADALORA_FAST_BACKEND"] = "triton"
    interpreting = dispatch.triton_interpreter_enabled
    dispatch.triton_interpreter_enabled = lambda: True
    try:
        yield
    finally:
        dispatch.triton_interpreter_enabled = interpreting
        del os.environ["ADALORA_FAST_BACKEND"]


def _layer_step(layer, x, grad):
    layer(x).backward(grad)


def _canonical(records, sizes, persistent):
    """The records with each parameter cut to its size, and each address not in ``persistent`` (the tensors both
    calls share) replaced by its order of first appearance: a call's fresh allocations, compared by role."""
    seen: dict = {}
    out = []
    for r in records:
        params = []
        for value, (size, is_pointer) in zip(r["params"], sizes[r["function"]]):
            value &= (1 << (8 * size)) - 1
            if is_pointer and value not in persistent:
                value = ("fresh", seen.setdefault(value, len(seen)))
            params.append(value)
        out.append({**r, "params": params})
    return out


def _declare_params(plan) -> dict:
    """{function: [(bytes, is a pointer)] of each parameter} of a plan's bound launches, declared to the stub
    libcuda (which then records their parameters)."""
    sizes = {}
    for bounds in (*plan.forwards.values(), *plan.backwards.values()):
        for bound in bounds:
            kernel = bound.entry.kernel
            types = [t for t in kernel.src.signature.values() if t != "constexpr"]
            sizes[bound.entry.function] = [(8, True) if t.startswith("*") else (
                {"i32": 4, "u32": 4, "fp32": 4, "i64": 8, "u64": 8, "fp64": 8, "i1": 1, "i8": 1, "i16": 2}[t], False)
                for t in types] + [(8, True), (8, True)]  # fmt: skip
            fake_driver.stub_declare_params(bound.entry.function, len(sizes[bound.entry.function]))
    return sizes


def _both_paths_launch_alike(call, sizes: dict, persistent: set, launches: int) -> None:
    """``call()`` with programs off (the Python path: ``launches`` direct launches) and on (as many program
    launches, none direct): the same launches, byte for byte (fresh allocations by order of appearance)."""
    start = len(fake_driver.stub_records())
    launch.set_launch_programs(False)
    try:
        before = launch.launch_counts()
        call()
        after = launch.launch_counts()
    finally:
        launch.set_launch_programs(True)
    assert after["program"] == before["program"] and after["direct"] - before["direct"] == launches, (before, after)
    python_path = fake_driver.stub_records(start)
    before = launch.launch_counts()
    call()
    after = launch.launch_counts()
    programs = fake_driver.stub_records(start + len(python_path))
    assert after["program"] - before["program"] == launches and after["direct"] == before["direct"], (before, after)
    assert len(python_path) == len(programs) == launches, (len(python_path), len(programs))
    assert _canonical(programs, sizes, persistent) == _canonical(python_path, sizes, persistent)
    assert all(r["num_attrs"] == 0 for r in programs)


def check_programs_replay_the_same_launches():
    """The fused layer's C++ node (csrc/svd_linear_program.cpp), on a call laid out as the one its programs were
    made on, makes the launches the Python path makes through Triton's own C launcher: the same functions,
    grids, blocks, shared memory, stream and (no) launch attributes, and the same parameters byte for byte
    (the addresses of each call's fresh allocations compared by their order of appearance); so does its
    forward alone, for a call with nothing to differentiate. A call the programs were not made for, or one
    with programs turned off, takes the Python path. Without Triton's C launcher (the Python stand-in) no
    program is made."""
    from adalora_fast import FastSVDLinear
    from adalora_fast.kernels import svd_adapter_op as op

    with _kernels_on_cpu_tensors():
        torch.manual_seed(0)
        layer = FastSVDLinear(40, 24, r=12, lora_alpha=12)
        x, grad = torch.randn(2, 8, 40, requires_grad=True), torch.randn(2, 8, 24)
        _layer_step(layer, x, grad)  # the Python path: binds the launches, then makes the programs
        if not NATIVE:
            assert not op._PROGRAM_PLANS, "a program was made without Triton's own C launcher"
            return
        (plan,) = op._PROGRAM_PLANS.values()
        assert plan.program_forward.__class__ is int and plan.programs_backward[True, True].__class__ is int
        sizes = _declare_params(plan)
        persistent = {t.data_ptr() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_E, layer.lora_B,
                                             layer.triplet_mask, layer.ranknum, grad)} | {0}  # fmt: skip
        _both_paths_launch_alike(lambda: _layer_step(layer, x, grad), sizes, persistent, 5)

        def no_grad_call():
            with torch.no_grad():
                assert layer(x).grad_fn is None

        _both_paths_launch_alike(no_grad_call, sizes, persistent, 2)  # the forward program alone
        # a call the programs were not made for (another scaling, a constant of their launches): the Python path
        layer.scaling = layer.scaling / 2
        before = launch.launch_counts()
        _layer_step(layer, x, grad)
        after = launch.launch_counts()
        assert after["program"] == before["program"] and after["direct"] - before["direct"] == 5, (before, after)


def check_add_programs_replay_the_same_launches():
    """The same for the adapter over any other base layer (``svd_adapter_add_triton``, the path of a quantized
    base: the base's output read, y fresh, the adapter's dx alone): its C++ node's launches, and its forward
    alone's, equal the Python path's byte for byte; dresult is dY, as there."""
    if not NATIVE:
        return
    from adalora_fast import FastSVDLinear
    from adalora_fast.adapter import SVDAdapter
    from adalora_fast.kernels import svd_adapter_op as op

    with _kernels_on_cpu_tensors():
        torch.manual_seed(0)
        layer = FastSVDLinear(40, 24, r=12, lora_alpha=12)
        adapter = SVDAdapter(layer.lora_A, layer.lora_E, layer.lora_B, layer.triplet_mask, float(layer.scaling),
                             layer.ranknum)  # fmt: skip
        x, result = torch.randn(2, 8, 40, requires_grad=True), torch.randn(2, 8, 24, requires_grad=True)
        grad = torch.randn(2, 8, 24)

        def step():
            result.grad = None
            op.svd_adapter_add_triton(result, x, adapter, torch.float32).backward(grad)
            assert torch.equal(result.grad, grad)

        step()  # the Python path: binds the launches, then makes the programs
        (plan,) = op._ADD_PROGRAM_PLANS.values()
        assert plan.programs_forward_add[torch.float32, torch.float32].__class__ is int
        assert plan.programs_backward[True, False].__class__ is int
        sizes = _declare_params(plan)
        persistent = {t.data_ptr() for t in (x, result, layer.lora_A, layer.lora_E, layer.lora_B, layer.triplet_mask,
                                             layer.ranknum, grad)} | {0}  # fmt: skip
        _both_paths_launch_alike(step, sizes, persistent, 5)

        def no_grad_call():
            with torch.no_grad():
                assert op.svd_adapter_add_triton(result, x, adapter, torch.float32).grad_fn is None

        _both_paths_launch_alike(no_grad_call, sizes, persistent, 2)


def check_program_node_computes_the_frozen_layer_as_the_python_path():
    """The C++ node's own ATen work: the frozen layer's output, dx = dY·W0 and, for a trainable base, dW and
    db, equal the Python path's to the bit, over fan_in_fan_out, with and without a bias, a frozen and a
    trainable base, 2-D and 3-D inputs, with and without dx, and under no_grad and inference_mode (the forward
    alone). (On the fake driver the kernels write nothing: what the two paths return is the base layer's part
    alone.)"""
    if not NATIVE:
        return  # no program without Triton's C launcher (check_programs_replay_the_same_launches)
    from adalora_fast import FastSVDLinear

    with _kernels_on_cpu_tensors():
        for fan_in_fan_out, bias, trainable, dims, x_grad in itertools.product((False, True), repeat=5):
            setup = dict(fan_in_fan_out=fan_in_fan_out, bias=bias, trainable=trainable, dims=dims + 2, x_grad=x_grad)
            torch.manual_seed(0)
            layer = FastSVDLinear(40, 24, r=12, lora_alpha=12, fan_in_fan_out=fan_in_fan_out, bias=bias)
            base = [p for p in (layer.weight, layer.bias) if p is not None]
            for p in base:
                p.requires_grad_(trainable)
            shape = (2, 8, 40) if dims else (16, 40)
            x = torch.randn(shape, requires_grad=x_grad)
            grad = torch.randn(*shape[:-1], 24)
            _layer_step(layer, x, grad)  # the Python path: binds the launches, makes the programs
            runs = {}
            for programs in (False, True):
                launch.set_launch_programs(programs)
                try:
                    x.grad = None
                    for p in base:
                        p.grad = None
                    before = launch.launch_counts()["program"]
                    y = layer(x)
                    y.backward(grad)
                    launched = launch.launch_counts()["program"] - before
                finally:
                    launch.set_launch_programs(True)
                runs[programs] = (launched, y.detach().clone(), x.grad, *[p.grad for p in base])
            # and with nothing to differentiate: the forward program alone, no autograd node
            for no_grad in (torch.no_grad, torch.inference_mode):
                outputs = {}
                for programs in (False, True):
                    launch.set_launch_programs(programs)
                    try:
                        before = launch.launch_counts()["program"]
                        with no_grad():
                            y = layer(x)
                        outputs[programs] = (launch.launch_counts()["program"] - before, y)
                    finally:
                        launch.set_launch_programs(True)
                (off, y_off), (on, y_on) = outputs[False], outputs[True]
                assert (off, on) == (0, 2) and y_on.grad_fn is None, (setup, no_grad, off, on)
                assert y_on.shape == y_off.shape and torch.equal(y_on, y_off), (setup, no_grad)
            assert runs[True][0] == 5 and runs[False][0] == 0, (setup, runs[True][0], runs[False][0])
            for a, b in zip(runs[False][1:], runs[True][1:]):
                assert (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                                     and torch.equal(a, b)), setup  # fmt: skip


def _unaligned_copy(t):
    """A saved tensor as a hook may hand it back: a dense copy 4 bytes past a 16-byte boundary (which
    ``.contiguous()`` leaves as it is)."""
    if t.dim() != 2:
        return t
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buffer[1:].view(t.shape)
    out.copy_(t)
    return out


def check_program_node_takes_hooked_tensors_and_draws_one_seed():
    """The C++ node's backward takes saved tensors a saved-tensor hook hands back unaligned (copied into its
    program's layout), with the Python path's result; and every layer call draws one dropout seed whichever path
    runs it: a call the op declines (another scaling) leaves torch's generator where the Python path leaves it."""
    if not NATIVE:
        return
    from adalora_fast import FastSVDLinear

    with _kernels_on_cpu_tensors():
        torch.manual_seed(0)
        layer = FastSVDLinear(40, 24, r=12, lora_alpha=12, lora_dropout=0.1)
        x, grad = torch.randn(2, 8, 40, requires_grad=True), torch.randn(2, 8, 24)
        _layer_step(layer, x, grad)  # makes the programs
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, _unaligned_copy)
        runs = {}
        for programs in (False, True):
            launch.set_launch_programs(programs)
            try:
                x.grad = None
                before = launch.launch_counts()["program"]
                torch.manual_seed(1)
                with hooks:
                    y = layer(x)
                y.backward(grad)
                runs[programs] = (launch.launch_counts()["program"] - before, y.detach().clone(), x.grad.clone(),
                                  torch.get_rng_state())  # fmt: skip
            finally:
                launch.set_launch_programs(True)
        assert (runs[False][0], runs[True][0]) == (0, 5), (runs[False][0], runs[True][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[False][1:], runs[True][1:]))  # (the generators too)
        layer.scaling = layer.scaling / 2  # a constant the programs were not made with: the op declines
        states = []
        for programs in (False, True):
            launch.set_launch_programs(programs)
            try:
                torch.manual_seed(2)
                before = launch.launch_counts()
                layer(x).backward(grad)
                after = launch.launch_counts()
                states.append(torch.get_rng_state())
            finally:
                launch.set_launch_programs(True)
            assert after["program"] == before["program"] and after["direct"] - before["direct"] == 5, (before, after)
        assert torch.equal(states[0], states[1]), "a declined call drew another seed"


CHECKS = [
    check_direct_calls_go_to_the_lowest_launch_call,
    check_jit_same_launch_and_specialization_misses,
    check_launch_hooks_and_metadata,
    check_grid_callable_sees_the_meta_parameters,
    check_autotuned_restore_value_tunes_once_per_key,
    check_switch_off_means_plain_launches,
    check_bound_launch_replays_the_same_launch,
    check_programs_replay_the_same_launches,
    check_add_programs_replay_the_same_launches,
    check_program_node_computes_the_frozen_layer_as_the_python_path,
    check_program_node_takes_hooked_tensors_and_draws_one_seed,
]


def main() -> None:
    results = {"triton": triton.__version__, "supported": launch.triton_supported(), "native": NATIVE}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = None
        except Exception:
            results[check.__name__] = traceback.format_exc()[-3000:]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
