"""A fake CUDA driver for Triton: the real (compiled, non-interpreter) launch path on a machine without a GPU.

For host-overhead measurements and launch-path tests only: test tooling, not part of the installed package.

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

With ``native=False`` (the default) the launcher's C ``launch`` call is what is left out: its argument
extraction (one ``data_ptr()`` call and ``cuPointerGetAttribute`` per tensor) and ``cuLaunchKernelEx``. With
``native=True`` (a machine without a CUDA driver: Linux, a C compiler) a stub ``libcuda.so.1`` is built (its
entry points return constants; ``cuLaunchKernelEx`` counts and returns) and Triton's own C launcher and
driver utilities are compiled against it, so that only ``cuLaunchKernelEx`` is left out; the stub counts the
launches that reached it (:func:`stub_launches`). The launcher is then Triton's ``CudaLauncher`` itself, and
``record=True`` records the calls of its C ``launch`` function (the lowest call Python makes).

Activate before the first launch, in a process without ``TRITON_INTERPRET=1`` (Triton decides between the
interpreter and the compiler when a ``@triton.jit`` function is defined, and ``adalora_fast.kernels``
chooses its tile configs by that flag when it is imported)::

    from tooling import fake_driver        # tests/ on sys.path
    fake = fake_driver.activate()          # before importing the kernel modules is safest
    import adalora_fast.kernels.svd_adapter
    ...
    fake.launch_count()                     # launches so far; fake.records when record=True
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
    """One launch: what ``CompiledKernel.run`` (the launcher) was called with, or, in native mode, what the
    launcher's C ``launch`` function was called with, in the same fields; ``c_extra`` then holds that call's
    other arguments (cooperative grid, PDL, the scratch pointers, and in 3.9 the argument annotations and
    signature)."""

    grid: tuple
    stream: int
    function: int
    packed_metadata: object
    launch_metadata: object
    enter_hook: object
    exit_hook: object
    args: tuple
    c_extra: tuple | None = None


def _record_of_c_launch(c_args: tuple) -> LaunchRecord:
    """A LaunchRecord of a call of CudaLauncher's C ``launch`` (the installed Triton's form of that call)."""
    if isinstance(c_args[-1], tuple) and len(c_args) == 16:  # 3.9: ..., annotations, signature, (args)
        g0, g1, g2, stream, function, coop, pdl, meta, lmeta, enter, leave, gs, ps, ann, sig, args = c_args
        return LaunchRecord((g0, g1, g2), stream, function, meta, lmeta, enter, leave, args,
                            (coop, pdl, gs, ps, ann, bytes(sig) if sig is not None else None))  # fmt: skip
    g0, g1, g2, stream, function, coop, pdl, gs, ps, meta, lmeta, enter, leave = c_args[:13]  # 3.6: args flat
    return LaunchRecord((g0, g1, g2), stream, function, meta, lmeta, enter, leave, tuple(c_args[13:]),
                        (coop, pdl, gs, ps))  # fmt: skip


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

# ------------------------------------------------------------------------------------------------------------
# native=True: a stub libcuda.so.1 for Triton's own C launcher
# ------------------------------------------------------------------------------------------------------------

_STUB_SOURCE = r"""
#include "cuda.h"
#include <stdint.h>
#include <string.h>

/* A CUDA driver that has no device: every query answers as an H100/H200 would, nothing runs. */
long long adalora_fast_stub_launches = 0;
unsigned adalora_fast_stub_last_grid[3] = {0, 0, 0};
static uintptr_t next_function = 0x10000;

CUresult CUDAAPI cuInit(unsigned int Flags) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int *v) { *v = 12080; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute a, CUdevice dev) {
  switch (a) {
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *pi = 49152; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
  case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *pi = 65536; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
  case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
  case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 2619000; break;
  case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 5120; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
  case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  default: *pi = 0;
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice dev) { *c = (CUcontext)0x1000; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)0x1000; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetLimit(size_t *v, CUlimit l) { *v = 1 << 20; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit l, size_t v) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult e, const char **s) { *s = "stub libcuda"; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleLoadData(CUmodule *m, const void *image) { *m = (CUmodule)0x2000; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleUnload(CUmodule m) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
  next_function += 0x10;
  *f = (CUfunction)next_function;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute a, CUfunction f) {
  switch (a) {
  case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 32; break;
  case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  default: *pi = 0;
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute a, CUdeviceptr p) {
  *(CUdeviceptr *)data = p;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *st) {
  *st = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) { *n = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *m, CUtensorMapDataType t, cuuint32_t r, void *g, const cuuint64_t *d,
    const cuuint64_t *s, const cuuint32_t *b, const cuuint32_t *e, CUtensorMapInterleave i, CUtensorMapSwizzle w,
    CUtensorMapL2promotion l, CUtensorMapFloatOOBfill o) { memset(m, 0, sizeof(*m)); return CUDA_SUCCESS; }
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *m, CUtensorMapDataType t, cuuint32_t r, void *g,
    const cuuint64_t *d, const cuuint64_t *s, const int *lo, const int *hi, cuuint32_t c, cuuint32_t p,
    const cuuint32_t *e, CUtensorMapInterleave i, CUtensorMapSwizzle w, CUtensorMapL2promotion l,
    CUtensorMapFloatOOBfill o) { memset(m, 0, sizeof(*m)); return CUDA_SUCCESS; }
/* Launch records, for the functions whose parameter count a test has declared: the configuration and the first
   8 bytes at each parameter (the caller compares the bytes of each parameter's size). */
#define STUB_MAX_PARAMS 64
#define STUB_MAX_RECORDS 256
#define STUB_MAX_FUNCTIONS 64
typedef struct {
  unsigned long long function, stream;
  unsigned grid[3], block[3], shared, num_attrs, num_params;
  unsigned long long params[STUB_MAX_PARAMS];
} StubRecord;
StubRecord adalora_fast_stub_records[STUB_MAX_RECORDS];
int adalora_fast_stub_record_count = 0;
static unsigned long long declared_functions[STUB_MAX_FUNCTIONS];
static unsigned declared_counts[STUB_MAX_FUNCTIONS];
static int declared = 0;
int adalora_fast_stub_declare_params(unsigned long long function, unsigned count) {
  if (count > STUB_MAX_PARAMS) return -1;
  for (int d = 0; d < declared; ++d) {  /* declared again: one record per launch all the same */
    if (declared_functions[d] == function) {
      declared_counts[d] = count;
      return 0;
    }
  }
  if (declared == STUB_MAX_FUNCTIONS) return -1;
  declared_functions[declared] = function;
  declared_counts[declared++] = count;
  return 0;
}
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
  adalora_fast_stub_launches++;
  adalora_fast_stub_last_grid[0] = config->gridDimX;
  adalora_fast_stub_last_grid[1] = config->gridDimY;
  adalora_fast_stub_last_grid[2] = config->gridDimZ;
  for (int d = 0; d < declared; ++d) {
    if (declared_functions[d] != (unsigned long long)(uintptr_t)f || adalora_fast_stub_record_count == STUB_MAX_RECORDS)
      continue;
    StubRecord *r = &adalora_fast_stub_records[adalora_fast_stub_record_count++];
    r->function = (unsigned long long)(uintptr_t)f;
    r->stream = (unsigned long long)(uintptr_t)config->hStream;
    r->grid[0] = config->gridDimX; r->grid[1] = config->gridDimY; r->grid[2] = config->gridDimZ;
    r->block[0] = config->blockDimX; r->block[1] = config->blockDimY; r->block[2] = config->blockDimZ;
    r->shared = config->sharedMemBytes;
    r->num_attrs = config->numAttrs;
    r->num_params = declared_counts[d];
    for (unsigned p = 0; p < declared_counts[d]; ++p) memcpy(&r->params[p], params[p], 8);
  }
  return CUDA_SUCCESS;
}
"""

_STUB = None


def _stub_dir() -> str:
    import hashlib

    tag = hashlib.sha256((_STUB_SOURCE + triton.__version__).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "adalora_fast", f"stub-libcuda-{tag}")


def load_stub_libcuda():
    """Build (once per Triton version, cached under ~/.cache/adalora_fast) and load the stub libcuda.so.1
    globally, so that Triton's C modules link against it and its ``dlopen("libcuda.so.1")`` finds it."""
    global _STUB
    if _STUB is not None:
        return _STUB
    import ctypes
    import shutil
    import subprocess
    import tempfile

    from triton.backends.nvidia import driver as nvidia

    directory = _stub_dir()
    path = os.path.join(directory, "libcuda.so.1")
    if not os.path.exists(path):
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
        if cc is None:
            raise RuntimeError("the native fake driver needs a C compiler (gcc, cc or clang)")
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "stub_libcuda.c")
            with open(src, "w") as f:
                f.write(_STUB_SOURCE)
            built = os.path.join(tmp, "libcuda.so.1")
            subprocess.check_call([cc, src, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", built,
                                   *(f"-I{d}" for d in nvidia.include_dirs)])  # fmt: skip
            os.replace(built, path)
    _STUB = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    # Triton's C modules link with -L<libcuda dirs> -l:libcuda.so.1
    from triton import knobs

    knobs.nvidia.libcuda_path = directory
    nvidia.libcuda_dirs.cache_clear()
    nvidia.library_dirs.cache_clear()
    return _STUB


def stub_launches() -> int:
    """How many launches reached the stub's cuLaunchKernelEx (native mode), or 0."""
    import ctypes

    if _STUB is None:
        return 0
    return ctypes.c_longlong.in_dll(_STUB, "adalora_fast_stub_launches").value


def stub_last_grid() -> tuple[int, int, int] | None:
    """The grid (in CTAs) of the last launch that reached the stub, or None."""
    import ctypes

    if _STUB is None:
        return None
    grid = (ctypes.c_uint * 3).in_dll(_STUB, "adalora_fast_stub_last_grid")
    return grid[0], grid[1], grid[2]


def _stub_record_type():
    import ctypes

    class StubRecord(ctypes.Structure):
        _fields_ = [("function", ctypes.c_ulonglong), ("stream", ctypes.c_ulonglong), ("grid", ctypes.c_uint * 3),
                    ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint), ("num_attrs", ctypes.c_uint),
                    ("num_params", ctypes.c_uint), ("params", ctypes.c_ulonglong * 64)]  # fmt: skip

    return StubRecord


def stub_declare_params(function: int, count: int) -> None:
    """Have the stub record every launch of ``function`` (a CUfunction handle) with its ``count`` parameters."""
    import ctypes

    declare = None if _STUB is None else _STUB.adalora_fast_stub_declare_params
    if declare is None or declare(ctypes.c_ulonglong(function), ctypes.c_uint(count)) != 0:
        raise RuntimeError("the stub libcuda records launches in native mode, for up to 64 functions")


def stub_records(start: int = 0) -> list[dict]:
    """The launches the stub recorded (of declared functions), from the ``start``-th: function, stream, grid,
    block, shared memory, number of launch attributes, and the first 8 bytes at each parameter."""
    import ctypes

    if _STUB is None:
        return []
    count = ctypes.c_int.in_dll(_STUB, "adalora_fast_stub_record_count").value
    records = (_stub_record_type() * 256).in_dll(_STUB, "adalora_fast_stub_records")
    return [{"function": r.function, "stream": r.stream, "grid": tuple(r.grid), "block": tuple(r.block),
             "shared": r.shared, "num_attrs": r.num_attrs, "params": list(r.params[: r.num_params])}
            for r in records[start:count]]  # fmt: skip


class FakeCudaDriver(GPUDriver):
    """See the module docstring."""

    def __init__(self, record: bool = False, bench: str = "first", native: bool = False):
        if bench not in ("first", "call"):
            raise ValueError(f"bench must be 'first' or 'call', got {bench!r}")
        # GPUDriver.__init__ would bind torch.cuda's queries, which fail without a GPU.
        self.native = native
        if native:
            load_stub_libcuda()
            from triton.backends.nvidia.driver import CudaUtils

            self.utils = CudaUtils()  # Triton's own, compiled against the stub
        else:
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

        if native:  # Triton's own launcher class; recording wraps its C launch call (the lowest Python-visible one)
            from triton.backends.nvidia.driver import CudaLauncher

            class RecordingCudaLauncher(CudaLauncher):
                def __init__(self, src, metadata):
                    super().__init__(src, metadata)
                    c_launch = self.launch

                    def launch(*c_args):
                        driver.launches += 1
                        driver.records.append(_record_of_c_launch(c_args))
                        return c_launch(*c_args)

                    self.launch = launch

            self.launcher_cls = RecordingCudaLauncher if record else CudaLauncher
        else:
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
    def launch_count(self) -> int:
        """Launches so far: those that reached the stub's cuLaunchKernelEx (native), else the launcher calls."""
        return stub_launches() if self.native else self.launches

    def clear_records(self) -> None:
        self.records.clear()
        self.launches = 0


_previous = None


def activate(record: bool = False, bench: str = "first", native: bool = False) -> FakeCudaDriver:
    """Make a new :class:`FakeCudaDriver` Triton's active driver and return it (``native``: see the module
    docstring; not in a process where a real CUDA driver is loaded).

    Refuses to run under ``TRITON_INTERPRET=1``: the interpreter never reaches a driver.
    """
    global _previous
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the fake driver measures Triton's compiled launch path: unset TRITON_INTERPRET first")
    from triton.runtime.driver import driver as config

    if not isinstance(config._active, FakeCudaDriver):
        _previous = config._active
    fake = FakeCudaDriver(record=record, bench=bench, native=native)
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


__all__ = ["FakeCudaDriver", "LaunchRecord", "TARGET", "activate", "active", "deactivate", "load_stub_libcuda",
           "stub_declare_params", "stub_records",
           "stub_launches", "stub_last_grid"]
