"""A fake CUDA driver for Triton: the real (compiled, non-interpreter) launch path on a machine without a GPU.

For host-overhead measurements and launch-path tests only; no production module imports this.

With the driver active, ``kernel[grid](...)`` runs Triton's own Python launch path end to end (binder and
specialization, cache lookup, autotuner, ``CompiledKernel.run`` and the launcher's Python), and kernels
really compile for ``GPUTarget("cuda", 90, 32)`` through ``triton.compile`` (ptxas ships with Triton).
Only what needs a GPU is replaced:

* device and stream queries return constants (device 0, stream 0);
* loading a binary is a no-op returning a fake module and a distinct function handle per kernel;
* the launcher is the installed Triton's own ``CudaLauncher.__call__`` (its scratch allocation and hooks)
  with the lowest call, the C ``launch`` that calls ``cuLaunchKernelEx``, replaced by a no-op. What the
  launcher was called with (grid, stream, function, packed metadata, launch metadata, hooks, every
  argument) is recorded when ``record=True``;
* the benchmarker that the autotuner uses does not run anything and reports one time for every config, so
  ``Autotuner.run`` keeps its first config (``min`` of equal timings is the first). With
  ``bench="call"`` it calls each config's kernel once first (compiling it and running the autotuner's
  pre/post hooks, e.g. ``restore_value``'s copies), still reporting equal times.

Not measured: the C launcher's argument extraction (one ``data_ptr()`` call and ``cuPointerGetAttribute``
per tensor) and ``cuLaunchKernelEx`` itself.

Activate before the first launch, in a process without ``TRITON_INTERPRET=1`` (Triton decides between the
interpreter and the compiler when a ``@triton.jit`` function is defined, and ``adalora_fast.kernels``
chooses its tile configs by that flag when it is imported)::

    from adalora_fast.kernels import fake_driver
    fake = fake_driver.activate()          # before importing the kernel modules is safest
    import adalora_fast.kernels.svd_adapter
    ...
    fake.launches                           # launcher calls so far; fake.records when record=True
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import GPUDriver

TARGET = GPUTarget("cuda", 90, 32)
# What Triton reads from an H100/H200's properties (compiler.max_shared_mem, occupancy helpers).
DEVICE_PROPERTIES = {
    "max_shared_mem": 232448,
    "max_num_regs": 65536,
    "multiprocessor_count": 132,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 5120,
}


@dataclass(frozen=True)
class LaunchRecord:
    """One call of a compiled kernel's launcher: exactly what ``CompiledKernel.run`` was called with."""

    grid: tuple
    stream: int
    function: int
    packed_metadata: object
    launch_metadata: object
    enter_hook: object
    exit_hook: object
    args: tuple


class _FakeUtils:
    """The driver's ``utils``: binary loading and device properties without a device."""

    def __init__(self):
        self._functions = itertools.count(1)
        self.loaded = 0

    def load_binary(self, name, kernel, shared, device):
        self.loaded += 1
        # (module, function, n_regs, n_spills, n_max_threads)
        return 1, next(self._functions), 32, 0, 1024

    def unload_module(self, module):
        return None

    def get_device_properties(self, device):
        return dict(DEVICE_PROPERTIES)

    def get_device_capability(self, device):
        return TARGET.arch // 10, TARGET.arch % 10


def _noop_launch(*args):
    return None


def _launcher_shell(src, metadata):
    """An instance of the installed Triton's CudaLauncher whose C ``launch`` is a no-op (its __init__, which
    compiles or loads the C launcher against libcuda, is skipped), or None when that class is unknown."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except Exception:
        return None
    shell = object.__new__(CudaLauncher)
    shell.num_ctas = getattr(metadata, "num_ctas", 1)
    shell.launch = _noop_launch
    shell.global_scratch_size = metadata.global_scratch_size
    shell.global_scratch_align = metadata.global_scratch_align
    shell.profile_scratch_size = getattr(metadata, "profile_scratch_size", 0)
    shell.profile_scratch_align = getattr(metadata, "profile_scratch_align", 1)
    shell.launch_cooperative_grid = metadata.launch_cooperative_grid
    shell.launch_pdl = getattr(metadata, "launch_pdl", False)
    shell.gsan_enabled = False  # attributes a newer launcher reads; harmless for an older one
    shell.arg_annotations = None
    shell.kernel_signature = None
    return shell


class FakeCudaDriver(GPUDriver):
    """See the module docstring."""

    def __init__(self, record: bool = False, bench: str = "first"):
        if bench not in ("first", "call"):
            raise ValueError(f"bench must be 'first' or 'call', got {bench!r}")
        # GPUDriver.__init__ would bind torch.cuda's queries, which fail without a GPU.
        self.utils = _FakeUtils()
        self.record = record
        self.bench = bench
        self.records: list[LaunchRecord] = []
        self.launches = 0
        self.benchmarked = 0
        driver = self

        class FakeLauncher:
            def __init__(self, src, metadata):
                self.src, self.metadata = src, metadata
                shell = _launcher_shell(src, metadata)
                self._shell_call = type(shell).__call__ if shell is not None else None
                self._shell = shell

            def __call__(self, gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata, enter_hook,
                         exit_hook, *args):  # fmt: skip
                driver.launches += 1
                if driver.record:
                    driver.records.append(LaunchRecord((gridX, gridY, gridZ), stream, function, packed_metadata,
                                                       launch_metadata, enter_hook, exit_hook, args))  # fmt: skip
                if self._shell_call is not None:
                    self._shell_call(self._shell, gridX, gridY, gridZ, stream, function, packed_metadata,
                                     launch_metadata, enter_hook, exit_hook, *args)  # fmt: skip

        self.launcher_cls = FakeLauncher

    # -- what Triton asks a driver -------------------------------------------------------------------------
    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        return None

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return TARGET.arch // 10, TARGET.arch % 10

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cpu

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            self.benchmarked += 1
            if self.bench == "call":
                kernel_call()
            return [1.0, 1.0, 1.0] if quantiles is not None else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(1)

    def clear_cache(self, cache):
        return None

    # -- helpers ---------------------------------------------------------------------------------------------
    def clear_records(self) -> None:
        self.records.clear()
        self.launches = 0


_previous = None


def activate(record: bool = False, bench: str = "first") -> FakeCudaDriver:
    """Make a new :class:`FakeCudaDriver` Triton's active driver and return it.

    Refuses to run under ``TRITON_INTERPRET=1``: the interpreter never reaches a driver.
    """
    global _previous
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the fake driver measures Triton's compiled launch path: unset TRITON_INTERPRET first")
    from triton.runtime.driver import driver as config

    if not isinstance(config._active, FakeCudaDriver):
        _previous = config._active
    fake = FakeCudaDriver(record=record, bench=bench)
    config.set_active(fake)
    return fake


def deactivate() -> None:
    """Restore the driver that was active before :func:`activate` (None: Triton creates one when next asked)."""
    from triton.runtime.driver import driver as config

    config._active = _previous


def active() -> FakeCudaDriver | None:
    """The active fake driver, or None."""
    from triton.runtime.driver import driver as config

    return config._active if isinstance(config._active, FakeCudaDriver) else None


__all__ = ["FakeCudaDriver", "LaunchRecord", "TARGET", "activate", "deactivate", "active"]
