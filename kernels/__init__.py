"""Triton kernels of adalora-fast, installed as ``adalora_fast.kernels``.

One kernel family per module; each has its PyTorch reference in
:mod:`adalora_fast.reference`, and :mod:`adalora_fast.dispatch` decides per
call whether a kernel or the reference runs.
"""
