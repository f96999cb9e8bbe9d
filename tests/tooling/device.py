"""Where the suite runs the kernels: one answer for every test and benchmark.

On a machine with CUDA the kernels run on the GPU. Without one they run on CPU tensors in Triton's
interpreter, which must be switched on before triton is first imported (``enable_interpreter_if_no_gpu``,
called by the root conftest.py). A test that runs the kernels takes its tensors' device from ``DEVICE``,
turns the kernels on with the ``kernels`` fixture (tests/conftest.py) and compares with the reference within
the dtype table's tolerances, never bit for bit: on a GPU the kernels run where a CPU runs the interpreter.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"  # a device type: for tensors' device= and torch.autocast alike

# The interpreter's bf16 tl.dot is wrong (it is not a kernel bug): bf16 kernel checks run on a GPU.
KERNEL_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ())
HALF_DTYPES = KERNEL_DTYPES[1:]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# The kernel path against the reference in the same setup, one table for every setup:
# (activations, adapter parameters, autocast dtype or None) -> (tolerance of y and dx, of dA, dE, dB),
# relative to each tensor's largest value. Mixed setups are compared with the reference there (= stock
# PEFT's SVDLinear, which upcasts x to the adapter's dtype, and under autocast runs its matmuls in
# autocast's dtype). Outputs carry the activations' rounding (2^-8 bf16, 2^-11 fp16); fp32 parameter
# gradients the TF32 rounding of the fp32 factors on a GPU (2^-11 per product; exact in the interpreter);
# under autocast the reference itself multiplies in half precision.
TOL = {
    (F64, F64, None): (1e-10, 1e-10),
    (F32, F32, None): (1e-4, 1e-4),
    (F16, F16, None): (1e-2, 1e-2),
    (BF16, BF16, None): (4e-2, 4e-2),
    (F16, F32, None): (2e-3, 5e-3),
    (BF16, F32, None): (1.6e-2, 5e-3),
    (F32, F16, None): (2e-3, 1e-2),
    (F32, F32, BF16): (1.6e-2, 1.6e-2),
    (BF16, F32, BF16): (1.6e-2, 1.6e-2),
    (F32, F32, F16): (2e-3, 5e-3),
}


def assert_close_to_scale(actual, expected, tol, what=""):
    """``actual`` within ``tol`` of ``expected``, relative to ``expected``'s largest value (at least 1)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def require_extension(cuda: bool = False) -> None:
    """Skip, or fail, a test that needs ``adalora_fast._C`` (``cuda``: its CUDA build, on a GPU) when it did not
    load. It skips where this machine cannot have it (no GPU; the install told not to build it:
    ADALORA_FAST_BUILD_EXT=0, FORCE_CUDA=0, a torch or toolkit without CUDA), and fails where the project's
    own install (scripts/install.sh, scripts/gpu_check.sh) builds it: then a missing piece is a failure."""
    import pytest
    from torch.utils.cpp_extension import CUDA_HOME

    from adalora_fast import extension

    module, err = extension.load_extension()
    what = "the CUDA build of adalora_fast._C" if cuda else "adalora_fast._C"
    if cuda and not ON_GPU:
        pytest.skip(f"{what} runs on a GPU, and this machine has none")
    if module is not None and (not cuda or module.built_with_cuda()):
        return
    if os.environ.get("ADALORA_FAST_BUILD_EXT", "1") == "0":
        pytest.skip(f"{what} is not built here (ADALORA_FAST_BUILD_EXT=0)")
    if cuda and (os.environ.get("FORCE_CUDA") == "0" or torch.version.cuda is None or CUDA_HOME is None):
        pytest.skip(f"{what} is not built here (FORCE_CUDA=0, or no CUDA toolkit for torch {torch.__version__})")
    found = f"it did not load ({type(err).__name__}: {err})" if module is None else "the one installed has no CUDA"
    pytest.fail(f"the project's install builds {what} on this machine, but {found}", pytrace=False)


def enable_interpreter_if_no_gpu() -> None:
    """Without CUDA, the Triton kernels run in the interpreter (set before triton is imported)."""
    if not ON_GPU:
        os.environ.setdefault("TRITON_INTERPRET", "1")
