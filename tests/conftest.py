"""Test configuration: on a machine without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported (peft imports it), and
the jit decorators pick interpreter or compiler when the kernel modules load.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    # Tests choose backends explicitly; a user's environment must not leak in.
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    yield

