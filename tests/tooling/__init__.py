"""Tools the test suite and the benchmarks share; none of them is part of the installed library.

  device.py          where the kernels run (DEVICE, ON_GPU) and the dtype table
  fake_driver.py     Triton's compiled launch path without a GPU (launch checks, host-overhead benchmark)
  compile_check.py   ahead-of-time sm_90/sm_80 builds of every kernel config (python -m tooling.compile_check)
  compile_matrix.py  whether the compile tests build their whole matrix or a representative subset
  venvs.py           venvs that see the packages of the Python the suite runs in (packaging tests)
"""
