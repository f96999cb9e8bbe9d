"""The lowest-cost launch path for a Triton kernel: ``CachedLauncher``.

``kernel[grid](*args, **constexprs)`` runs, on every call, Triton's whole host path: the binder
(specialization of every argument), the kernel-cache key (``str`` of the options), the autotuner's key
(every argument's dtype), the check of the kernel's globals, the launch metadata and the launch hooks, and
then the compiled kernel's launcher. A ``CachedLauncher`` does that once per cache key and afterwards calls
the compiled kernel's launcher directly (for Triton's own ``CudaLauncher`` of a verified version, with no
scratch memory to allocate, the C ``launch`` function beneath it, with the arguments its ``__call__`` would
pass)::

    shrink = CachedLauncher(svd_adapter_shrink)       # module level, one per kernel (autotuned or not)
    shrink(grid, *args, **constexprs)                 # the meaning of svd_adapter_shrink[grid](*args, **constexprs)

``grid`` is a tuple or a callable of the launch's meta-parameters, as for ``kernel[grid]``. The return value is
the ``CompiledKernel`` that ran (what ``kernel[grid](...)`` returns).

A caller that already knows that its next calls specialise alike (same shapes, strides, dtypes, alignment)
can go one step further: ``bound = shrink.bind(grid, *args, **constexprs)`` launches once and returns a
:class:`BoundLaunch` (the compiled kernel, its config and its grid), and ``bound(current_stream(), args)``
launches again without any per-call key. The adapter's launchers keep their bound launches per operand layout
(``svd_adapter_op.SVDAdapterPlan``).

When a cached launch is the same launch
---------------------------------------
The first call with a given key goes through Triton's normal path (``Autotuner.run`` / ``JITFunction.run``:
autotuning, with its ``restore_value`` / ``reset_to_zero`` hooks, happens there, once per key, as before) and
records the config it chose and the ``CompiledKernel`` it launched. The key holds everything that decides
which compiled kernel Triton would launch:

* the current device (Triton compiles and caches per device);
* the Python type of every positional argument;
* for a tensor: its dtype and whether ``data_ptr()`` is 16-byte aligned;
* for an int: whether it is 1, whether it is divisible by 16, and whether it fits int32 / int64 (Triton
  specialises ints equal to 1 as constants, marks multiples of 16, and types ints i32 / i64 / u64);
* floats, bools and None: their type alone (Triton specialises them on their type alone);
* any other object: Triton's own ``native_specialize_impl`` of it;
* the exact value of every autotune-key argument, and every keyword argument (constexprs and options) by
  name and value.

That is at least as fine as Triton's own kernel-cache key (its specialization of every argument, the
constexprs and the options) together with the autotuner's key (its key arguments' values and every
argument's dtype), so a call that hits a cache entry would have been launched by Triton with the same config
and the same compiled kernel. What the direct call then passes to the launcher is what Triton's
``JITFunction.run`` passes (grid, current stream, function, packed metadata, the launch metadata and hooks,
then the arguments and the constexprs in signature order); the launch hooks and their metadata are left out
(None) only while both of Triton's launch hook chains are empty, as calling an empty chain does nothing.

The direct path runs only where it is known to be the same launch: a ``JITFunction`` or an ``Autotuner``
over one, called with every non-constexpr parameter positional and every constexpr by keyword (the form of
every launch in this package), with no ``pre_run_hooks`` and no per-config ``pre_hook``, on a Triton whose
launch path has been checked (3.6 to 3.9). Otherwise, under ``TRITON_INTERPRET=1``, or with
``ADALORA_FAST_DIRECT_LAUNCH=0`` in the environment when this module is imported (or after
``set_direct_launch(False)``), every call is the plain ``kernel[grid](...)``.

Launch programs (:func:`make_program`) go one step further for the adapter's layer calls (fused, or over any
other base layer): their bound launches, written as a table a C++ autograd node replays
(``csrc/svd_linear_program.cpp``), so that a steady-state layer call is one op call. They run only where direct launches do, on Triton's own C launcher; with
``ADALORA_FAST_LAUNCH_PROGRAMS=0`` in the environment (or after ``set_launch_programs(False)``) none is made
or run, and the layer launches from Python.

What Triton checks on every call and a cached launch does not: that the module globals a kernel reads have
not changed since it was compiled (this package's kernels read one, the constexpr ``_RANKNUM_EPS``, which
never changes), and Triton's debug and instrumentation knobs (decided when the entry is made; call
:func:`clear_all` after changing them: it also clears the caches of bound launches registered with
:func:`on_clear_all`, such as the adapter's plans).

CUDA graphs: the direct launch asks Triton's driver for the current stream, as Triton does, so a capture
records it on the capturing stream.
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Mapping

import torch

from . import interpreting

try:  # Triton is optional for the package (the PyTorch reference runs without it)
    import triton
    from triton import knobs as _knobs
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel
    from triton.runtime.autotuner import Autotuner as _Autotuner
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction

    try:
        from triton.knobs import HookChain as _HookChain
    except ImportError:  # pragma: no cover - older Triton: hooks are plain callables or None
        _HookChain = None
    _TRITON_VERSION = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])
except Exception:  # pragma: no cover
    triton = None
    _TRITON_VERSION = None

# Triton versions whose launch path (JITFunction.run -> CompiledKernel.run(grid, stream, function, packed
# metadata, launch metadata, enter hook, exit hook, *args)) this module has been checked against.
VERIFIED_TRITON = ((3, 6), (3, 9))
ENV = "ADALORA_FAST_DIRECT_LAUNCH"
PROGRAMS_ENV = "ADALORA_FAST_LAUNCH_PROGRAMS"
MAX_ENTRIES = 4096  # per launcher; past this the cache starts over (a bound, not a working size)


def triton_supported() -> bool:
    """Whether the installed Triton's launch path is one this module drives directly."""
    return (
        _TRITON_VERSION is not None
        and VERIFIED_TRITON[0] <= _TRITON_VERSION <= VERIFIED_TRITON[-1]
        and not interpreting()
    )


_ENABLED = os.environ.get(ENV, "1") != "0"


def set_direct_launch(enabled: bool) -> None:
    """Turn the direct path on or off for every launcher (off: every call is ``kernel[grid](...)``)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def direct_launch_enabled() -> bool:
    return _ENABLED


_PROGRAMS_ENABLED = os.environ.get(PROGRAMS_ENV, "1") != "0"


def set_launch_programs(enabled: bool) -> None:
    """Turn launch programs on or off (off: the layer calls launch from Python; programs already made are kept
    for when they are turned on again)."""
    global _PROGRAMS_ENABLED
    _PROGRAMS_ENABLED = bool(enabled)


_LAUNCHERS: weakref.WeakSet = weakref.WeakSet()


_BOUND_CACHES: list = []  # clear functions of the caches that hold BoundLaunches (the adapter's plans)


def on_clear_all(clear) -> None:
    """Have :func:`clear_all` also call ``clear`` (a cache of :class:`BoundLaunch` objects)."""
    _BOUND_CACHES.append(clear)


def clear_all() -> None:
    """Forget every launcher's cached launches and every cache of bound launches (the next call per key goes
    through Triton again)."""
    for launcher in list(_LAUNCHERS):
        launcher.clear()
    for clear in _BOUND_CACHES:
        clear()


def launch_counts() -> dict[str, int]:
    """Launches so far, by path: over every launcher ``direct`` (the cached launcher call), ``triton`` (Triton's
    normal path, filling the cache) and ``plain`` (``kernel[grid](...)``: direct launch off or not possible);
    and ``program``, the launches C++ launch programs made (:func:`make_program`)."""
    counts = {"direct": 0, "triton": 0, "plain": 0}
    for launcher in list(_LAUNCHERS):
        for path, n in launcher.counts().items():
            counts[path] += n
    counts["program"] = _program_launches() - _PROGRAM_LAUNCHES_AT_RESET[0]
    return counts


def reset_counts() -> None:
    for launcher in list(_LAUNCHERS):
        launcher.direct = launcher.triton = launcher.plain = 0
    _PROGRAM_LAUNCHES_AT_RESET[0] = _program_launches()


# How a direct launch calls the launcher: through the launcher object (any Triton, any launcher), or, for
# Triton's own CudaLauncher of a verified version with nothing to allocate, its C ``launch`` function itself,
# with the arguments CudaLauncher.__call__ would give it (3.9: the kernel arguments as one tuple after the
# launcher's argument annotations and signature; 3.6: the scratch pointers before the metadata, then the
# arguments flat).
_VIA_LAUNCHER, _C_LAUNCH_39, _C_LAUNCH_36 = 0, 1, 2


def _lowest_call_form(launcher) -> int:
    """Which call a direct launch makes for this launcher (see above)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except Exception:  # pragma: no cover - no CUDA backend in this Triton
        return _VIA_LAUNCHER
    if not isinstance(launcher, CudaLauncher) or type(launcher).__call__ is not CudaLauncher.__call__:
        return _VIA_LAUNCHER  # another launcher, or one whose call does more: keep it
    if getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
        return _VIA_LAUNCHER  # the launcher allocates scratch memory per launch
    if getattr(launcher, "gsan_enabled", False):
        return _VIA_LAUNCHER
    if _TRITON_VERSION == (3, 9) and hasattr(launcher, "arg_annotations") and hasattr(launcher, "kernel_signature"):
        return _C_LAUNCH_39
    if _TRITON_VERSION == (3, 6) and not hasattr(launcher, "arg_annotations"):
        return _C_LAUNCH_36
    return _VIA_LAUNCHER


class _Entry:
    """What a direct launch needs, decided by the first call with a key."""

    __slots__ = ("kernel", "run", "function", "packed_metadata", "tail", "meta", "form", "c_launch", "coop", "pdl",
                 "annotations", "signature")  # fmt: skip

    def __init__(self, kernel, tail, meta):
        self.kernel = kernel
        self.run = kernel.run  # the launcher (the property loads the binary the first time)
        self.function = kernel.function
        self.packed_metadata = kernel.packed_metadata
        self.tail = tail  # the constexpr parameters' values in signature order
        self.meta = meta  # name -> value of those parameters, for grid callables
        self.form = _lowest_call_form(self.run)
        self.c_launch = self.coop = self.pdl = self.annotations = self.signature = None
        if self.form != _VIA_LAUNCHER:
            self.c_launch = self.run.launch
            self.coop, self.pdl = self.run.launch_cooperative_grid, self.run.launch_pdl
        if self.form == _C_LAUNCH_39:
            self.annotations, self.signature = self.run.arg_annotations, self.run.kernel_signature

    def launch(self, g0, g1, g2, stream, metadata, enter, leave, args):
        """The launcher call, or the call CudaLauncher.__call__ would make for it."""
        form = self.form
        if form == _C_LAUNCH_39:
            self.c_launch(g0, g1, g2, stream, self.function, self.coop, self.pdl, self.packed_metadata, metadata,
                          enter, leave, None, None, self.annotations, self.signature, (*args, *self.tail))  # fmt: skip
        elif form == _C_LAUNCH_36:
            self.c_launch(g0, g1, g2, stream, self.function, self.coop, self.pdl, None, None, self.packed_metadata,
                          metadata, enter, leave, *args, *self.tail)  # fmt: skip
        else:
            self.run(g0, g1, g2, stream, self.function, self.packed_metadata, metadata, enter, leave, *args,
                     *self.tail)  # fmt: skip


class _GridMeta(Mapping):
    """The launch's meta-parameters as a grid callable sees them (``kernel[grid]`` passes a dict of every
    parameter): constexprs from the entry, the rest read from the call's arguments only when asked for."""

    __slots__ = ("_fixed", "_index", "_args")

    def __init__(self, fixed, index, args):
        self._fixed, self._index, self._args = fixed, index, args

    def __getitem__(self, name):
        fixed = self._fixed
        if name in fixed:
            return fixed[name]
        return self._args[self._index[name]]

    def __iter__(self):
        yield from self._index
        yield from self._fixed

    def __len__(self):
        return len(self._index) + len(self._fixed)


_NUMBERS = (float, bool, type(None))


def _make_keyfn(types: tuple, tune_positions: frozenset, spec):
    """A function of the positional arguments returning their specialization key (straight-line code for
    these argument types, like Triton's own binder), or None when these types cannot be keyed.

    The usual case, every pointer 16-byte aligned and every int within int32, is one guard and a short key:
    each tensor's dtype, one class per int (a multiple of 16, equal to 1, or neither). Otherwise the key has
    every tensor's alignment and every int's classes in full (is it 1, a multiple of 16, int32, int64)."""
    names = [f"a{i}" for i in range(len(types))]
    tensors = [a for t, a in zip(types, names) if issubclass(t, torch.Tensor)]
    ints = [a for t, a in zip(types, names) if t is int]
    short, full = [], []
    for i, (t, a) in enumerate(zip(types, names)):
        if i in tune_positions:
            if t not in (int, float, bool, str, type(None)):
                return None  # an autotune key that is not a plain value: leave it to Triton
            short.append(a)
            full.append(a)
        if issubclass(t, torch.Tensor):
            short.append(f"{a}.dtype")
            full += [f"{a}.dtype", f"{a}.data_ptr() & 15 == 0"]
        elif t is int:
            short.append(f"(not {a} & 15) + 2 * ({a} == 1)")
            full += [f"{a} == 1", f"{a} & 15 == 0", f"-0x80000000 <= {a} <= 0x7fffffff", f"{a} <= 0x7fffffffffffffff"]
        elif t in _NUMBERS:
            pass  # specialised on the type alone, and the type is in the key
        else:
            short.append(f"_spec({a})")
            full.append(f"_spec({a})")
    guard = []
    if tensors:
        guard.append(f"({' | '.join(f'{a}.data_ptr()' for a in tensors)}) & 15")
    if ints:
        guard.append(f"not ({' and '.join(f'-0x80000000 <= {a} <= 0x7fffffff' for a in ints)})")
    body = f"    return ({''.join(p + ', ' for p in short)})\n"
    if guard:
        body = f"    if {' or '.join(guard)}:\n        return ('full', {''.join(p + ', ' for p in full)})\n" + body
    src = f"def keyfn({', '.join(names)}):\n{body}"
    scope = {"_spec": spec}
    exec(src, scope)  # noqa: S102 - generated from the argument types only
    return scope["keyfn"]


def _hooks_empty() -> bool:
    """Whether both of Triton's launch hook chains are empty (then its launcher calls nothing with metadata)."""
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (enter is None or (enter.__class__ is _HookChain and not enter.calls)) and (
        leave is None or (leave.__class__ is _HookChain and not leave.calls)
    )


def _launch(entry: _Entry, g0: int, g1: int, g2: int, stream, args) -> None:
    """A direct launch of a cached entry: its launcher with the launch metadata and hooks only when a hook is set."""
    if _hooks_empty():
        entry.launch(g0, g1, g2, stream, None, None, None, args)
    else:
        runtime = _knobs.runtime
        metadata = entry.kernel.launch_metadata((g0, g1, g2), stream, *args, *entry.tail)
        entry.launch(g0, g1, g2, stream, metadata, runtime.launch_enter_hook, runtime.launch_exit_hook, args)


_DIRECT_POSSIBLE = triton is not None and triton_supported()


def current_device():
    """Triton's current device (what a direct launch is made on), or None where no launch is direct."""
    return _driver.active.get_current_device() if _DIRECT_POSSIBLE else None


def current_stream():
    """Triton's current stream on its current device, or None where no launch is direct."""
    if not _DIRECT_POSSIBLE:
        return None
    active = _driver.active
    return active.get_current_stream(active.get_current_device())


class BoundLaunch:
    """One launch of a :class:`CachedLauncher` fixed in everything but its arguments' values: the compiled
    kernel Triton chose, its config and its grid. ``bound(stream, args)`` launches it again on ``args`` (the
    positional arguments, as a tuple) on ``stream`` (:func:`current_stream`).

    The caller guarantees that ``args`` specialise as the bound ones did (the same types, dtypes, 16-byte
    alignment, int classes and autotune-key values: e.g. by keying on the shapes, strides and dtypes they are
    made of, and checking the pointers' alignment); the launch is then the one ``kernel[grid](*args)`` would
    make, without the per-call key. Where the launcher's direct path is off or impossible, it is the
    launcher's own call.
    """

    __slots__ = ("launcher", "entry", "grid", "kwargs", "g0", "g1", "g2")

    def __init__(self, launcher: CachedLauncher, entry: _Entry | None, grid, kwargs: dict, grid3: tuple):
        self.launcher, self.entry, self.grid, self.kwargs = launcher, entry, grid, kwargs
        self.g0, self.g1, self.g2 = grid3

    @property
    def direct(self) -> bool:
        return self.entry is not None

    def __call__(self, stream, args: tuple) -> None:
        entry = self.entry
        if entry is None or not _ENABLED:
            self.launcher(self.grid, *args, **self.kwargs)
            return
        _launch(entry, self.g0, self.g1, self.g2, stream, args)
        self.launcher.direct += 1


# ---------------------------------------------------------------------------------------------------------------
# Launch programs: bound launches replayed from C++ (csrc/svd_linear_program.cpp)
# ---------------------------------------------------------------------------------------------------------------

_PROGRAM_KERNELS: dict = {}  # id -> the CompiledKernel whose function handle a program may hold

# Bytes of a constant parameter of each scalar type, as Triton's launcher packs it (ints in their C type, floats
# in their storage type: fp32 as its 32 bits).
_INT_BYTES = {"i1": 1, "i8": 1, "u1": 1, "u8": 1, "i16": 2, "u16": 2, "i32": 4, "u32": 4, "i64": 8, "u64": 8}
_MAX_SHARED_WITHOUT_ATTRIBUTE = 228 * 1024  # above it Triton 3.9 adds a launch attribute a program does not make
_CONSTANT, _POINTER = 0, 1


def _as_int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 a program's table holds (the same bits)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _constant_param(ty: str, value) -> list[int] | None:
    if ty in _INT_BYTES:
        nbytes = _INT_BYTES[ty]
        return [_CONSTANT, nbytes, _as_int64(int(value) & ((1 << (8 * nbytes)) - 1))]
    if ty in ("fp32", "f32"):
        return [_CONSTANT, 4, struct.unpack("<I", struct.pack("<f", float(value)))[0]]
    if ty == "fp64":
        return [_CONSTANT, 8, _as_int64(struct.unpack("<Q", struct.pack("<d", float(value)))[0])]
    return None


def program_launch(bound: BoundLaunch, args: tuple, slots: tuple) -> list[int] | None:
    """``bound`` (made on ``args``) as an entry of a C++ launch program's table: the compiled function, grid,
    block, shared memory, then each parameter Triton's launcher passes (its arguments in signature order
    without the constexprs, each tensor named by its index in ``slots``, by identity; then the null scratch
    pointers). None when the launch is not one a program makes the same way: not a direct launch of Triton's
    own launcher (:func:`_lowest_call_form`), more than one CTA per cluster, PDL, a cooperative grid, shared
    memory past what needs a launch attribute, a tensor not in ``slots``, or a parameter type it does not pack."""
    entry = bound.entry
    if entry is None or entry.form == _VIA_LAUNCHER or entry.coop or entry.pdl:
        return None
    metadata = entry.kernel.metadata
    if metadata.num_ctas != 1 or metadata.shared > _MAX_SHARED_WITHOUT_ATTRIBUTE:
        return None
    types = list(entry.kernel.src.signature.values())
    if len(types) != len(args) + len(entry.tail) or any(ty != "constexpr" for ty in types[len(args):]):
        return None
    params: list[int] = []
    for value, ty in zip(args, types):
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            index = next((i for i, t in enumerate(slots) if t is value), None)
            if index is None:
                return None
            params += [_POINTER, index, 0]
        else:
            param = _constant_param(ty, value)
            if param is None:
                return None
            params += param
    params += [_CONSTANT, 8, 0] * 2  # the global and profile scratch pointers (no scratch: null)
    # A program holds the raw function handle: the compiled kernel that owns its module (and unloads it when
    # collected) is kept for the process, as long as any program or graph node may launch it.
    _PROGRAM_KERNELS[id(entry.kernel)] = entry.kernel
    return [_as_int64(entry.function), bound.g0, bound.g1, bound.g2, 32 * metadata.num_warps, metadata.shared,
            len(params) // 3, *params]  # fmt: skip


def programs_possible() -> bool:
    """Whether launches may be replayed from C++ here: programs and direct launches on, and an extension built
    with them."""
    return _PROGRAMS_ENABLED and _ENABLED and _DIRECT_POSSIBLE and _program_class() is not None


def launch_hooks_empty() -> bool:
    """Whether no Triton launch hook is set (a program's launches call none)."""
    return _hooks_empty()


_PROGRAM_CLASS = []


def _program_class():
    if not _PROGRAM_CLASS:
        from adalora_fast.extension import load_extension

        cls = None
        if load_extension()[0] is not None:
            try:
                cls = torch.classes.adalora_fast.LaunchProgram
            except (AttributeError, RuntimeError):
                cls = None
        _PROGRAM_CLASS.append(cls)
    return _PROGRAM_CLASS[0]


_PROGRAM_LAUNCHES_AT_RESET = [0]


def _program_launches() -> int:
    """The launches programs have made in this process (none where no program can exist)."""
    if not _PROGRAM_CLASS or _PROGRAM_CLASS[0] is None:
        return 0
    return torch.ops.adalora_fast.launch_program_launches()


def make_program(slots: tuple, launches: list[list[int]], scalars, device_index: int, with_dx: bool):
    """A C++ launch program over ``slots`` (each tensor's dtype, sizes and strides are what every call's must be)
    running ``launches`` (:func:`program_launch` entries), registered with the extension; returns its handle
    (what the op takes). ``scalars``: the float values its constants were made of, checked per call;
    ``with_dx``: a backward program's, made for calls that need dx."""
    slot_table = [len(slots)]
    for t in slots:
        slot_table += [_SCALAR_TYPE_CODES[t.dtype], t.dim(), *t.shape, *t.stride()]
    launch_table = [len(launches)]
    for launch in launches:
        launch_table += launch
    return _program_class()(device_index, slot_table, launch_table, [float(v) for v in scalars], with_dx).register()


# c10::ScalarType's codes of the dtypes a slot may hold
_SCALAR_TYPE_CODES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
                      torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15}  # fmt: skip


class CachedLauncher:
    """``launcher(grid, *args, **constexprs)`` = ``kernel[grid](*args, **constexprs)``, at the cost of a
    dictionary lookup and the launcher call once a key has been seen. See the module docstring."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.direct = self.triton = self.plain = 0
        self._entries: dict = {}
        self._keyfns: dict = {}
        self.autotuner = kernel if triton is not None and isinstance(kernel, _Autotuner) else None
        fn = kernel.fn if self.autotuner is not None else kernel
        self.jit = fn if triton is not None and isinstance(fn, _JITFunction) else None
        self._n_positional = None
        if self.jit is not None:
            params = self.jit.params
            first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
            if all(p.is_constexpr for p in params[first:]):
                self._n_positional = first
                self._index = {p.name: i for i, p in enumerate(params[:first])}
                self._tail_names = tuple(p.name for p in params[first:])
                self._defaults = {p.name: p.default for p in params[first:] if p.has_default}
                keys = self.autotuner.keys if self.autotuner is not None and len(self.autotuner.configs) > 1 else ()
                self._tune_positions = frozenset(self._index[k] for k in keys if k in self._index)
        self._usable = self._n_positional is not None and triton_supported()
        _LAUNCHERS.add(self)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {"direct": self.direct, "triton": self.triton, "plain": self.plain}

    def clear(self) -> None:
        self._entries.clear()

    def __repr__(self):
        name = getattr(self.jit, "__name__", None) or repr(self.kernel)
        return f"CachedLauncher({name}, entries={len(self._entries)}, {self.counts()})"

    # -- launch ----------------------------------------------------------------------------------------------
    def __call__(self, grid, *args, **kwargs):
        found = self._lookup(args, kwargs)
        if found is None:
            self.plain += 1
            return self.kernel[grid](*args, **kwargs)
        key, entry = found
        if entry is None:
            return self._first_launch(key, grid, args, kwargs)
        g0, g1, g2 = self._grid3(entry, grid, args)
        _launch(entry, g0, g1, g2, _driver.active.get_current_stream(key[1]), args)
        self.direct += 1
        return entry.kernel

    def bind(self, grid, *args, **kwargs) -> BoundLaunch:
        """Launch ``kernel[grid](*args, **kwargs)``, and return that launch as a :class:`BoundLaunch`: the same
        compiled kernel, config and grid, to launch again on arguments that specialise as these do."""
        self(grid, *args, **kwargs)
        found = self._lookup(args, kwargs)
        entry = found[1] if found is not None else None
        if entry is None:  # launches of this key are plain: so are the bound ones
            return BoundLaunch(self, None, grid, kwargs, (1, 1, 1))
        grid3 = self._grid3(entry, grid, args)
        return BoundLaunch(self, entry, grid3, kwargs, grid3)

    def key(self, *args, **kwargs):
        """The cache key of a call with these arguments (what each cached launch computes), or None for a call
        the direct path cannot take."""
        found = self._lookup(args, kwargs)
        return None if found is None else found[0]

    def _grid3(self, entry: _Entry, grid, args) -> tuple[int, int, int]:
        """The launch's grid as three ints (a grid callable sees the entry's meta-parameters)."""
        if callable(grid):
            grid = grid(_GridMeta(entry.meta, self._index, args))
        return (*grid, 1, 1)[:3]

    def _lookup(self, args, kwargs):
        """(key, its entry or None when the key is new) for a call the direct path can take, else None."""
        if not (_ENABLED and self._usable and len(args) == self._n_positional):
            return None
        types = tuple(map(type, args))
        keyfn = self._keyfns.get(types)
        if keyfn is None:
            keyfn = self._keyfns[types] = _make_keyfn(types, self._tune_positions, self._spec) or False
        if keyfn is False:
            return None
        key = (keyfn, _driver.active.get_current_device(), keyfn(*args), *kwargs.items())
        try:
            return key, self._entries.get(key)
        except TypeError:  # an unhashable keyword argument: Triton's path
            return None

    @staticmethod
    def _spec(value):
        """Triton's own specialization of an argument of a type the key function has no rule for."""
        from triton._C.libtriton import native_specialize_impl
        from triton.backends import BaseBackend

        return native_specialize_impl(BaseBackend, value, False, True, True)

    def _first_launch(self, key, grid, args, kwargs):
        """Triton's normal path (autotuning, compiling); then the entry for this key."""
        self.triton += 1
        kernel = self.kernel[grid](*args, **kwargs)
        if not isinstance(kernel, _CompiledKernel) or self.jit.pre_run_hooks:
            return kernel  # e.g. an asynchronous compile's future: nothing to cache
        merged = dict(kwargs)
        if self.autotuner is not None:
            config = self.autotuner.best_config
            if config.pre_hook is not None:
                return kernel  # Triton calls it before every launch: keep Triton's path
            merged.update(config.all_kwargs())
        try:
            tail = tuple(merged[name] if name in merged else self._defaults[name] for name in self._tail_names)
        except KeyError:
            return kernel
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = _Entry(kernel, tail, dict(zip(self._tail_names, tail)))
        return kernel


__all__ = [
    "BoundLaunch",
    "CachedLauncher",
    "current_device",
    "current_stream",
    "VERIFIED_TRITON",
    "clear_all",
    "direct_launch_enabled",
    "launch_counts",
    "on_clear_all",
    "reset_counts",
    "set_direct_launch",
    "triton_supported",
]
