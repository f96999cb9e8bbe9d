"""Triton kernels of adalora-fast, installed as ``adalora_fast.kernels``.

One kernel family per module; each has its PyTorch reference in
:mod:`adalora_fast.reference`, and :mod:`adalora_fast.dispatch` decides per
call whether a kernel or the reference runs. This file imports nothing from
Triton, so that the dispatcher can ask :func:`interpreting` without it.

  svd_adapter_op.py   the op, top to bottom: the kernel path's entry point, the autograd path, the
                      torch.library ops, the launchers and their plans (a layout's launches bound once),
                      dropout seeds
  svd_adapter.py      the adapter's Triton kernels and their tile configs
  importance_ema.py   the sensitivity/EMA tile math the backward's epilogues share
  dropout.py          in-kernel dropout: the keep mask from a seed, the same in the forward and the backward
  precision.py        how products are computed: dot constexprs per dtype pair, the tile product
  tiles.py            grid math, the rank's tile width, autotune config lists
  launch.py           CachedLauncher and BoundLaunch, the lowest-cost launches of a compiled kernel

The ahead-of-time compile check and the fake CUDA driver that test these kernels without a GPU are test
tooling, not part of the package: tests/tooling/compile_check.py, tests/tooling/fake_driver.py.
"""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1; read per call, although Triton
    itself decides when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
