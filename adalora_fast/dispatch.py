"""The one place that decides, per call, whether an op runs a kernel or the PyTorch reference.

``ADALORA_FAST_BACKEND`` forces a backend for the adapter op:

* unset or ``auto``: the fused Triton kernels when they can run on the input
  (a CUDA tensor of a supported dtype, with Triton importable), else the reference;
* ``reference``: always the PyTorch reference;
* ``triton``: always the kernels, and a clear error when they cannot run.

:func:`env_report` says which backend each op would use here, and why.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

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


@functools.lru_cache(maxsize=None)
def _import_adapter_kernels():
    """The Triton adapter module, or the exception that stopped it from importing (tried once)."""
    try:
        return importlib.import_module("adalora_fast.kernels.svd_adapter"), None
    except Exception as exc:  # ImportError, or a Triton that fails on import
        return None, exc


def triton_unavailable_reason(x: torch.Tensor | None = None) -> str | None:
    """Why the Triton adapter kernels cannot run on ``x`` here, or None when they can."""
    module, err = _import_adapter_kernels()
    if module is None:
        return f"the Triton adapter kernels could not be imported ({type(err).__name__}: {err})"
    if x is None:
        return None
    if not (x.is_cuda or triton_interpreter_enabled()):
        return f"the input is on {x.device}; the Triton kernels run on CUDA devices (or anywhere with TRITON_INTERPRET=1)"
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernels support {[str(d) for d in KERNEL_DTYPES]}, not {x.dtype}"
    return None


def adapter_backend(x: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for one adapter call on ``x``."""
    forced = requested_backend()
    if forced == "reference":
        return "reference"
    reason = triton_unavailable_reason(x)
    if forced == "triton":
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}=triton, but the Triton backend cannot run: {reason}")
        return "triton"
    return "reference" if reason is not None else "triton"


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
    report["svd_adapter"] = backend if reason is None else f"{backend} ({reason})"
    report["orth_penalty"] = "reference (the csrc/ extension is not part of this build)"
    report["rank_allocator"] = "reference"
    return report
