"""The one place that decides, per call, whether an op runs a kernel or the PyTorch reference.

``ADALORA_FAST_BACKEND`` forces a backend:

* unset or ``auto``: the fused Triton kernels for the adapter when they can run
  on the input (a CUDA tensor of a supported dtype, one dtype for the input and
  the layer, no autocast, with Triton importable), and the compiled extension for
  the penalty on CUDA tensors when it was built with CUDA; otherwise the
  reference (on a CPU the reference penalty is as fast as the extension's CPU
  build and equal to PEFT's bit for bit; the CPU build runs when asked for);
* ``reference``: every op runs its PyTorch reference;
* ``triton``: the adapter always runs the kernels, with a clear error when they
  cannot; with ``TRITON_INTERPRET=1`` this includes CPU tensors (how the test
  suite runs the kernels without a GPU).

:func:`env_report` says which backend each op would use here, and why.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .extension import load_extension, warn_extension_fallback

BACKEND_ENV = "ADALORA_FAST_BACKEND"
ADAPTER_BACKENDS = ("reference", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def requested_backend() -> str | None:
    """The backend forced through the environment, or None for automatic choice."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ADAPTER_BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {('auto',) + ADAPTER_BACKENDS}")
    return value


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _try_import_adapter_kernels():
    try:
        return importlib.import_module("adalora_fast.kernels.svd_adapter"), None
    except Exception as exc:  # ImportError, or a Triton that fails on import
        return None, exc


# Tried once, when the package loads: a plain module global, so torch.compile reads it as a constant.
_ADAPTER_KERNELS = _try_import_adapter_kernels()


def _import_adapter_kernels():
    """The Triton adapter module, or the exception that stopped it from importing."""
    return _ADAPTER_KERNELS


def triton_unavailable_reason(x: torch.Tensor | None = None, *params: torch.Tensor) -> str | None:
    """Why the Triton adapter kernels cannot run on ``x`` (with the layer's ``params``) here, or None when they can."""
    module, err = _import_adapter_kernels()
    if module is None:
        return f"the Triton adapter kernels could not be imported ({type(err).__name__}: {err})"
    if x is None:
        return None
    if not (x.is_cuda or triton_interpreter_enabled()):
        return f"the input is on {x.device}; the Triton kernels run on CUDA devices (or anywhere with TRITON_INTERPRET=1)"
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernels support {[str(d) for d in KERNEL_DTYPES]}, not {x.dtype}"
    mixed = sorted({str(p.dtype) for p in params if p is not None and p.dtype != x.dtype})
    if mixed:
        return f"the input is {x.dtype} but the layer holds {mixed}; the kernels need one dtype"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on; the kernels run one dtype end to end"
    return None


_ADAPTER_FALLBACK_WARNED = False


def _warn_adapter_fallback(reason: str) -> None:
    """Once: a CUDA input runs the reference adapter because the kernels could not be loaded."""
    global _ADAPTER_FALLBACK_WARNED
    if not _ADAPTER_FALLBACK_WARNED:
        _ADAPTER_FALLBACK_WARNED = True
        warnings.warn(f"adalora_fast: the SVD adapter runs its PyTorch reference on CUDA tensors because {reason}",
                      RuntimeWarning, stacklevel=4)  # fmt: skip


def adapter_backend(x: torch.Tensor, *params: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for one adapter call on ``x`` with the layer's ``params``."""
    forced = requested_backend()
    if forced == "reference":
        return "reference"
    if forced is None and not x.is_cuda:
        return "reference"  # the interpreter runs CPU tensors only when asked for: it is a test tool
    reason = triton_unavailable_reason(x, *params)
    if reason is not None and forced is None and _import_adapter_kernels()[0] is None:
        _warn_adapter_fallback(reason)
    if forced == "triton":
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}=triton, but the Triton backend cannot run: {reason}")
        return "triton"
    return "reference" if reason is not None else "triton"


def penalty_unavailable_reason(device_type: str) -> str | None:
    """Why the compiled penalty op cannot run on this device type, or None when it can."""
    module, err = load_extension()
    if module is None:
        return f"the extension adalora_fast._C did not load ({type(err).__name__}: {err})"
    if device_type == "cuda" and not module.built_with_cuda():
        return "the extension adalora_fast._C was built without CUDA"
    if device_type not in ("cpu", "cuda"):
        return f"the extension has no implementation for {device_type} tensors"
    return None


def penalty_backend(t: torch.Tensor, requested: str | None = None) -> str:
    """``"extension"`` or ``"reference"`` for one penalty call on tensors like ``t``.

    ``requested="extension"`` asks for the compiled op on any device it was built for (an error names
    the reason when it cannot run); None lets the dispatcher choose.
    """
    if requested not in (None, "extension", "reference"):
        raise ValueError(f"penalty backend must be 'extension' or 'reference', got {requested!r}")
    if requested == "extension":
        reason = penalty_unavailable_reason(t.device.type)
        if reason is not None:
            raise RuntimeError(f"the penalty extension cannot run: {reason}")
        return "extension"
    if requested == "reference" or requested_backend() == "reference":
        return "reference"
    if t.is_cuda and penalty_unavailable_reason(t.device.type) is None:
        return "extension"
    if load_extension()[0] is None:
        warn_extension_fallback("the orthogonality penalty")
    return "reference"


def env_report() -> dict:
    """Versions, devices and, for each op, the backend it runs on here with the reason."""
    report = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "triton_interpret": triton_interpreter_enabled(),
        "forced_backend": os.environ.get(BACKEND_ENV) or "auto",
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception as exc:
        report["triton"] = f"unavailable ({type(exc).__name__}: {exc})"
    probe = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        backend = adapter_backend(probe)
        reason = triton_unavailable_reason(probe)
    except (RuntimeError, ValueError) as exc:
        backend, reason = "error", str(exc)
    if backend == "reference" and reason is None:
        reason = "CPU tensors run the reference; the kernels run on CUDA tensors"
    report["svd_adapter"] = backend if reason is None else f"{backend} ({reason})"
    reason = penalty_unavailable_reason(probe.device.type)
    forced_reference = os.environ.get(BACKEND_ENV, "").strip().lower() == "reference"
    if forced_reference:
        report["orth_penalty"] = f"reference ({BACKEND_ENV}=reference)"
    elif reason is not None:
        report["orth_penalty"] = f"reference ({reason})"
    elif probe.is_cuda:
        report["orth_penalty"] = "extension (adalora_fast._C, CUDA)"
    else:
        report["orth_penalty"] = "reference on CPU tensors (the extension's CPU build is loaded, used on request)"
    report["rank_allocator"] = "flat state, a constant number of ops per step (adalora_fast.flat_state)"
    return report
