"""Triton kernels of adalora-fast, installed as ``adalora_fast.kernels``.

One kernel family per module; each has its PyTorch reference in
:mod:`adalora_fast.reference`, and :mod:`adalora_fast.dispatch` decides per
call whether a kernel or the reference runs. This file imports nothing from
Triton, so that the dispatcher can ask :func:`interpreting` without it.

  svd_adapter.py         the adapter's Triton kernels and their tile configs
  svd_adapter_launch.py  their launchers and plans (a layout's launches bound once): workspace, grids, seeds
  svd_adapter_op.py      the autograd path and the torch.library ops (the kernel path's entry point)
  importance_ema.py      the sensitivity/EMA tile math the backward's epilogues share
  launch.py              CachedLauncher and BoundLaunch, the lowest-cost launches of a compiled kernel
  utils.py               tile math, dropout, dot precision and autotune config helpers

The ahead-of-time compile check and the fake CUDA driver that test these kernels without a GPU are test
tooling, not part of the package: tests/tooling/compile_check.py, tests/tooling/fake_driver.py.
"""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1; read per call, although Triton
    itself decides when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
