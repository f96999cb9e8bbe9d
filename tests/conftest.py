"""Test configuration: on a machine without a GPU, Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton is imported (peft imports it), and
the jit decorators pick interpreter or compiler when the kernel modules load.
"""

import os
import sys

import torch

# The benchmarks' shared workloads (benchmarks/bench_common.py: Llama, MiniLM) are not in the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads: N workers × all
# cores of OpenMP threads on a small machine spin in each other's barriers (most of a CPU run's time).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    # Tests choose backends explicitly; a user's environment must not leak in.
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    yield



# Tests that take a minute or more on a small machine (a compiler, a child Python, a whole fine-tune) start
# first: under pytest-xdist a long test that starts last sets the wall time of the run.
LONG_RUNNING = (
    "test_every_kernel_compiles_for_sm90_and_sm80",
    "test_cuda_sources_compile_for_sm90_and_sm80",
    "test_the_check_writes_a_summary",
    "test_offline_install",
    "test_without_pyproject",
    "test_distributed.py",
    "test_pretrained_minilm.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, name in enumerate(LONG_RUNNING) if name in item.nodeid), len(LONG_RUNNING))

    items.sort(key=rank)  # stable: the others keep their order
