"""Test configuration: where the kernels run, and the guards that keep the suite's verdict the same on a CPU
and on a GPU.

Where a test runs the kernels comes from one place, :mod:`tooling.device` (the root conftest.py turns
Triton's interpreter on when there is no GPU). The ``kernels`` fixture is the one way a test runs the
adapter's kernels: it forces them (``ADALORA_FAST_BACKEND=triton``), hands the test ``DEVICE`` and, at
teardown, asserts that kernels were launched. ``backend`` runs a test once on each backend, forced, the
same way; ``reference_backend`` forces the PyTorch reference.

Guards, checked after every test:

* without a GPU, a kernel launched by a test that took neither ``kernels`` nor ``backend`` fails the test: its tensors are
  CPU tensors on every machine, and on a GPU machine (no interpreter) Triton cannot run them;
* in a test that runs on ``DEVICE`` (its code, its fixtures or the module's functions they call name it),
  an adapter call whose backend was chosen automatically fails the test: that choice is the reference on a
  CPU and the kernels on a GPU, so no expectation holds on both (take ``kernels`` or ``reference_backend``; a test of the automatic
  choice itself is marked ``automatic_dispatch`` and states what it expects on each machine);
* a CUDA call that fell back from the kernels to the reference (on a GPU; or a stand-in for a CUDA tensor
  anywhere) fails the test, unless it is marked ``allows_fallback`` (the fallback is then what it tests).
"""

import inspect
import os
import types

import pytest
import torch

from tooling.device import DEVICE, ON_GPU

from adalora_fast import dispatch

# Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads: N workers × all
# cores of OpenMP threads on a small machine spin in each other's barriers (most of a CPU run's time).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

try:
    from adalora_fast.kernels.launch import launch_counts
except ImportError:  # no Triton: no kernel can launch, and the kernel tests fail on their own imports

    def launch_counts():
        return {}


def _launches() -> int:
    return sum(launch_counts().values())


def pytest_configure(config):
    config.addinivalue_line("markers", "automatic_dispatch: the test checks the dispatcher's automatic choice "
                                       "itself, with expectations for the machine it runs on")  # fmt: skip
    config.addinivalue_line("markers", "allows_fallback: a CUDA call falling back to the reference is what the "
                                       "test checks")  # fmt: skip


class KernelRun:
    """What the ``kernels`` fixture hands a test: the device to put its tensors on."""

    device = DEVICE

    def __init__(self):
        self.launches_at_start = _launches()

    def launches(self) -> int:
        """Kernel launches since the test started."""
        return _launches() - self.launches_at_start


@pytest.fixture
def kernels(monkeypatch):
    """The adapter runs its Triton kernels on ``DEVICE`` (a GPU, or the interpreter on a CPU); the test fails
    if none was launched."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    run = KernelRun()
    yield run
    assert run.launches() > 0, "the test took the `kernels` fixture but launched no kernel"


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Each backend in turn, forced, for a test on ``DEVICE``; the kernels' turn fails if none was launched."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, request.param)
    run = KernelRun()
    yield request.param
    assert request.param == "reference" or run.launches() > 0, "the triton backend launched no kernel"


@pytest.fixture
def reference_backend(monkeypatch):
    """Every op runs its PyTorch reference, on every machine."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")


def _automatic_decisions(decisions: dict) -> list[tuple]:
    """The adapter decisions made without a forced backend (the environment variable unset or "auto")."""
    return [key for key in decisions if (key[0] or "auto").strip().lower() == "auto"]


def _names(code: types.CodeType):
    """The global names a function's code (nested functions and lambdas included) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _reaches_device(func, module, seen: set) -> bool:
    """Whether ``func``, or a function of ``module`` that it calls (transitively), names ``DEVICE``."""
    code = getattr(inspect.unwrap(func), "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _names(code)
    if "DEVICE" in names:
        return True
    return any(
        inspect.isfunction(obj) and obj.__module__ == module.__name__ and _reaches_device(obj, module, seen)
        for obj in (module.__dict__.get(name) for name in names)
    )


def _runs_on_device(item) -> bool:
    if getattr(item.module, "DEVICE", None) is None:
        return False
    seen = set()
    funcs = [item.function] + [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values() if defs]
    return any(_reaches_device(func, item.module, seen) for func in funcs)


@pytest.fixture(autouse=True)
def _seed_backend_and_guards(monkeypatch, request):
    torch.manual_seed(0)
    # Tests choose backends explicitly; a user's environment must not leak in.
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    # The dispatcher caches one decision per setup; a fresh table shows which decisions this test made.
    monkeypatch.setattr(dispatch, "_DECISIONS", {})
    launches = _launches()
    yield
    problems = []
    if not ON_GPU and not {"kernels", "backend"} & set(request.fixturenames) and _launches() > launches:
        problems.append(
            "launched kernels without the `kernels` fixture: on a GPU machine its tensors would be CPU tensors, "
            "which Triton runs only in the interpreter (take `kernels` and put the tensors on its device)"
        )
    automatic = _automatic_decisions(dispatch._DECISIONS)
    if automatic and request.node.get_closest_marker("automatic_dispatch") is None and _runs_on_device(request.node):
        problems.append(
            f"chose the adapter's backend automatically ({len(automatic)} setups) in a test that runs on DEVICE: "
            "that is the reference on a CPU and the kernels on a GPU (take `kernels` or `reference_backend`)"
        )
    fallbacks = [reason for _, reason, action in dispatch._DECISIONS.values() if action == "warn"]
    if fallbacks and request.node.get_closest_marker("allows_fallback") is None:
        problems.append(f"a CUDA call fell back to the reference: {fallbacks[0]}")
    if problems:
        pytest.fail(f"{request.node.nodeid}: " + "; ".join(problems), pytrace=False)


# Tests that take long on a small machine (a compiler, a child Python, a whole fine-tune, the interpreter on a
# model), longest first, start first: under pytest-xdist a long test that starts last sets the wall time of the
# run. Each entry is a test file's name or the start of a test function's
# (tests/test_suite_guards.py checks that each still names one).
LONG_RUNNING = (
    "test_deepspeed.py",
    "test_the_check_goes_on_past_a_failed_extension_build",
    "test_peft_dtype_setups.py",
    "test_cuda_sources_compile_for_sm90_and_sm80",
    "test_pretrained_minilm.py",
    "test_gradcheck_float64_through_the_kernels",
    "test_distributed.py",
    "test_offline_install",
    "test_patched_llama_on_the_kernel_path_matches_stock_peft",
    "test_without_pyproject",
    "test_step_overhead.py",
    "test_bench_rank_allocation.py",
    "test_host_overhead.py",
    "test_ranks.py",
    "test_every_kernel_compiles_for_sm90_and_sm80",
    "test_demo.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, name in enumerate(LONG_RUNNING) if name in item.nodeid), len(LONG_RUNNING))

    items.sort(key=rank)  # stable: the others keep their order
