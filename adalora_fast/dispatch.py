"""The one place that decides, per call, whether an op runs a kernel or the PyTorch reference; for the SVD
adapter op it also routes the call there (:func:`svd_adapter_linear`).

``ADALORA_FAST_BACKEND`` forces a backend:

* unset or ``auto``: the fused Triton kernels for the adapter when they can run
  on the input (a CUDA tensor; activations in fp16, bf16 or fp32, under
  ``torch.autocast`` too; adapter parameters of one of those dtypes, which may
  differ from the activations', as in PEFT's default of fp32 adapters over a
  half-precision model; Triton importable), and the compiled extension for the
  penalty on CUDA tensors when it was built with CUDA; otherwise the
  reference. A CUDA call that takes the reference warns once per distinct
  reason, naming it;
* ``reference``: every op runs its PyTorch reference;
* ``triton``: the adapter always runs the kernels, with a clear error when they
  cannot. CPU tensors run them only in Triton's interpreter, so the kernels run
  on a CPU with both ``TRITON_INTERPRET=1`` (set before triton is imported) and
  ``ADALORA_FAST_BACKEND=triton`` (how the test suite runs them without a GPU).

:func:`env_report` says which backend each op would use here, and why;
:func:`backend_calls` counts the calls each backend took since import.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import torch

from .adapter import SVDAdapter, check_adapter_add_input
from .dtypes import KERNEL_DTYPES, activation_dtype
from .extension import load_extension, warn_extension_fallback
from .kernels import interpreting as triton_interpreter_enabled  # (kernels/__init__ imports no Triton)
from .reference.adapter import svd_adapter_add_reference, svd_linear_reference

BACKEND_ENV = "ADALORA_FAST_BACKEND"
ADAPTER_BACKENDS = ("reference", "triton")

try:  # a guarded static import: without Triton the library still runs, and says why
    from .kernels import svd_adapter_op as _svd_adapter_op  # the kernel path, from its entry point down

    _ADAPTER_KERNELS = (_svd_adapter_op, None)
except Exception as _exc:  # ImportError, or a Triton that fails on import
    _svd_adapter_op = None
    _ADAPTER_KERNELS = (None, _exc)

# Calls per op and backend since import (eager calls, and each trace under torch.compile).
_CALLS = {"svd_adapter": Counter(), "orth_penalty": Counter()}


def requested_backend() -> str | None:
    """The backend forced through the environment, or None for automatic choice."""
    value = os.environ.get(BACKEND_ENV)
    if not value:
        return None
    value = value.strip().lower()
    if value == "auto":
        return None
    if value not in ADAPTER_BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {('auto',) + ADAPTER_BACKENDS}")
    return value


def _import_adapter_kernels():
    """The Triton adapter module, or the exception that stopped it from importing."""
    return _ADAPTER_KERNELS


def triton_unavailable_reason(x: torch.Tensor | None = None, *params: torch.Tensor | None) -> str | None:
    """Why the Triton adapter kernels cannot run on ``x`` with the adapter's parameters ``params``
    (lora_A, lora_E, lora_B) here, or None when they can."""
    module, err = _import_adapter_kernels()
    if module is None:
        return f"the Triton adapter kernels could not be imported ({type(err).__name__}: {err})"
    if x is None:
        return None
    if not (x.is_cuda or triton_interpreter_enabled()):
        return (
            f"the input is on {x.device}; the Triton kernels run on CUDA tensors, and on CPU tensors only in "
            f"Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported, with {BACKEND_ENV}=triton)"
        )
    act = activation_dtype(x)
    if act not in KERNEL_DTYPES:
        return f"the kernels take {'/'.join(str(d)[6:] for d in KERNEL_DTYPES)} activations, not {act}"
    if params:
        dtype = params[0].dtype
        if any(p.dtype is not dtype for p in params[1:]):
            dtypes = [str(p.dtype) for p in params]
            return f"the adapter's parameters (lora_A, lora_E, lora_B) have different dtypes {dtypes}; the kernels need one"
        if dtype not in KERNEL_DTYPES:
            return f"the kernels take fp16/bf16/fp32 adapter parameters, not {dtype}"
    return None


_WARNED: set[str] = set()


def _warn_adapter_fallback(reason: str) -> None:
    """Once per distinct reason: a CUDA input runs the reference adapter, and why."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"adalora_fast: the SVD adapter runs its PyTorch reference on CUDA tensors because {reason}",
                      RuntimeWarning, stacklevel=4)  # fmt: skip


def _decide_adapter_backend(x: torch.Tensor, params, forced: str | None) -> tuple[str, str | None, str | None]:
    """(backend, reason, what to do about it: None, "warn" or "raise") for one setup."""
    if forced == "reference":
        return "reference", f"{BACKEND_ENV}=reference", None
    if forced is None and not x.is_cuda:
        # the interpreter runs CPU tensors only when asked for: it is a test tool
        return "reference", "CPU tensors run the reference; the kernels run on CUDA tensors", None
    reason = triton_unavailable_reason(x, *params)
    if forced == "triton":
        return ("triton", None, None) if reason is None else ("reference", reason, "raise")
    if reason is not None:
        return "reference", reason, "warn"
    return "triton", None, None


# Decisions per setup: what decides one is in its key (the environment variable as set, whether the kernels
# imported, the input's device type and dtype, autocast's state and dtype there, the parameters' dtypes), so a
# steady-state call reads one environment variable and does one dictionary lookup instead of the checks.
# (Whether Triton interprets is not in it: Triton decides that once, when it is imported.)
_DECISIONS: dict[tuple, tuple[str, str | None, str | None]] = {}


def _choose_adapter_backend(x: torch.Tensor, params) -> tuple[str, str | None]:
    env = os.environ.get(BACKEND_ENV)
    # (x.device.type builds a device object: half a microsecond per call)
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    key = (env, _ADAPTER_KERNELS[0] is None, device_type, x.dtype, autocast, *[p.dtype for p in params])
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _DECISIONS[key] = _decide_adapter_backend(x, params, requested_backend())
    backend, reason, action = decision
    if action == "raise":
        raise RuntimeError(f"{BACKEND_ENV}=triton, but the Triton backend cannot run: {reason}")
    if action == "warn":
        _warn_adapter_fallback(reason)
    return backend, reason


_ADAPTER_CALLS = _CALLS["svd_adapter"]


def adapter_backend(x: torch.Tensor, *params: torch.Tensor | None) -> str:
    """``"triton"`` or ``"reference"`` for one adapter call on ``x`` with the adapter's ``params``
    (lora_A, lora_E, lora_B); counted in :func:`backend_calls`."""
    backend = _choose_adapter_backend(x, params)[0]
    _ADAPTER_CALLS[backend] += 1
    return backend


def svd_adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: SVDAdapter,
                       importance=None) -> torch.Tensor:  # fmt: skip
    """``base(x) + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` for an :class:`~adalora_fast.adapter.SVDAdapter`, on the
    backend :func:`adapter_backend` picks: the kernel op's entry point
    (:func:`~adalora_fast.kernels.svd_adapter_op.svd_linear_triton`) or the PyTorch reference. The input's
    dtype must follow :func:`~adalora_fast.adapter.check_input_dtype` (checked by the callers).

    ``importance``: an :class:`~adalora_fast.importance.ImportanceState` this call's backward emits into
    (paper order): the kernels get its :meth:`~adalora_fast.importance.ImportanceState.emission`, the
    reference arms its gradient hooks.
    """
    if adapter_backend(x, adapter.lora_A, adapter.lora_E, adapter.lora_B) == "triton":
        emission = importance.emission() if importance is not None else None
        return _svd_adapter_op.svd_linear_triton(x, weight, bias, adapter, emission=emission)
    if importance is not None:
        importance.arm_gradient_hooks()
    dropout_p = adapter.dropout_p
    return svd_linear_reference(
        x, weight, bias, adapter.lora_A, adapter.lora_E, adapter.lora_B, adapter.triplet_mask, adapter.scaling,
        adapter.ranknum, fan_in_fan_out=adapter.fan_in_fan_out, dropout_p=dropout_p, training=dropout_p > 0,
    )  # fmt: skip



def svd_adapter_add(result: torch.Tensor, x: torch.Tensor, adapter: SVDAdapter, out_dtype: torch.dtype | None = None,
                    importance=None, *, seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """``result + s·dropout(x)·Aᵀ·diag(E⊙m)·Bᵀ`` for the output ``result`` of any base layer on ``x``
    (bitsandbytes 4-/8-bit, GPTQ, an ``nn.Linear`` subclass, …), as a new tensor of ``out_dtype`` (default:
    ``result``'s), on the backend :func:`adapter_backend` picks: the kernel op
    (:func:`~adalora_fast.kernels.svd_adapter_op.svd_adapter_add_triton`) or the PyTorch reference
    (:func:`~adalora_fast.reference.adapter.svd_adapter_add_reference`). The backward adds the adapter's dx
    to the base layer's own. ``importance`` as for :func:`svd_adapter_linear`; ``seed``: the kernels' dropout
    seed (None: drawn on the device).
    """
    check_adapter_add_input(result, x, adapter)
    out_dtype = result.dtype if out_dtype is None else out_dtype
    if adapter_backend(x, adapter.lora_A, adapter.lora_E, adapter.lora_B) == "triton":
        emission = importance.emission() if importance is not None else None
        return _svd_adapter_op.svd_adapter_add_triton(result, x, adapter, out_dtype, seed=seed, emission=emission)
    if importance is not None:
        importance.arm_gradient_hooks()
    dropout_p = adapter.dropout_p
    return svd_adapter_add_reference(
        result, x, adapter.lora_A, adapter.lora_E, adapter.lora_B, adapter.triplet_mask, adapter.scaling,
        adapter.ranknum, out_dtype=out_dtype, dropout_p=dropout_p, training=dropout_p > 0,
    )  # fmt: skip

def backend_calls() -> dict[str, dict[str, int]]:
    """Calls per op and backend since import (or the last :func:`reset_backend_calls`): what actually ran.

    ``{"svd_adapter": {"triton": n, "reference": m}, "orth_penalty": {"extension": k, "reference": l}}``.
    Eager calls are counted one by one; under ``torch.compile`` each trace counts once.
    """
    return {op: dict(counts) for op, counts in _CALLS.items()}


def reset_backend_calls() -> None:
    for counts in _CALLS.values():
        counts.clear()


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


def _choose_penalty_backend(t: torch.Tensor, requested: str | None) -> tuple[str, str | None]:
    if requested not in (None, "extension", "reference"):
        raise ValueError(f"penalty backend must be 'extension' or 'reference', got {requested!r}")
    if requested == "extension":
        reason = penalty_unavailable_reason(t.device.type)
        if reason is not None:
            raise RuntimeError(f"the penalty extension cannot run: {reason}")
        return "extension", None
    if requested == "reference":
        return "reference", "asked for"
    if requested_backend() == "reference":
        return "reference", f"{BACKEND_ENV}=reference"
    reason = penalty_unavailable_reason(t.device.type)
    if t.is_cuda and reason is None:
        return "extension", None
    if load_extension()[0] is None:
        warn_extension_fallback("the orthogonality penalty")
    if reason is None:  # CPU tensors, extension loaded
        reason = "CPU tensors run the reference unless backend='extension' is asked for"
    return "reference", reason


def penalty_backend(t: torch.Tensor, requested: str | None = None) -> str:
    """``"extension"`` or ``"reference"`` for one penalty call on tensors like ``t``; counted in
    :func:`backend_calls`.

    ``requested="extension"`` asks for the compiled op on any device it was built for (an error names
    the reason when it cannot run); None lets the dispatcher choose.
    """
    backend = _choose_penalty_backend(t, requested)[0]
    _CALLS["orth_penalty"][backend] += 1
    return backend


def env_report() -> dict:
    """Versions, devices and, for each op, the backend it runs on here with the reason (the dispatcher's
    own choice for a probe tensor on this machine's default device), and the calls counted so far."""
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
    for op, choose in (("svd_adapter", _choose_adapter_backend), ("orth_penalty", _choose_penalty_backend)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a report, not a call: the reason is in the entry
                backend, reason = choose(probe, ()) if op == "svd_adapter" else choose(probe, None)
        except (RuntimeError, ValueError) as exc:
            backend, reason = "error", str(exc)
        if backend == "extension":
            reason = "adalora_fast._C, " + ("CUDA" if probe.is_cuda else "CPU")
        report[op] = backend if reason is None else f"{backend} ({reason})"
    report["rank_allocator"] = "flat state, a constant number of ops per step (adalora_fast.flat_state)"
    report["calls"] = backend_calls()
    return report
