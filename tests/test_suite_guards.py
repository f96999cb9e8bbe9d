"""The suite's guards (tests/conftest.py) fail the tests they exist for, and only those.

Each case is a small test run by pytest in one child process with the suite's own conftest: a test that would
be red on a GPU for a reason a CPU hides (a forced backend on CPU tensors, an expectation that holds only on
the automatic choice's reference) fails here too, with the guard's message.
"""

import ast
import glob
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

from tooling.device import ON_GPU

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

CONFTEST = f"""
import importlib.util, sys
sys.path[:0] = [{os.path.join(ROOT, "tests")!r}, {os.path.join(ROOT, "benchmarks")!r}]
from tooling.device import enable_interpreter_if_no_gpu
enable_interpreter_if_no_gpu()
spec = importlib.util.spec_from_file_location("suite_conftest", {os.path.join(TESTS, "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
globals().update({{k: v for k, v in vars(suite).items() if not k.startswith("__")}})
"""

CASES = '''
import pytest
import torch
from tooling.device import DEVICE

from adalora_fast import FastSVDLinear, dispatch


class FakeCuda:
    is_cuda = True
    device = torch.device("cpu")
    dtype = torch.float64


def _layer(device="cpu"):
    return FastSVDLinear(8, 4, r=2).to(device)


def test_forced_backend_on_cpu_tensors(monkeypatch):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")
    _layer()(torch.randn(3, 8))


def test_automatic_choice_on_device_tensors():
    layer = _layer(DEVICE)
    torch.testing.assert_close(layer(torch.randn(3, 8, device=DEVICE)), torch.zeros(3, 4, device=DEVICE), rtol=1, atol=1e9)


def test_kernels_fixture_without_a_kernel(kernels):
    torch.zeros(1)


def test_fallback_on_a_cuda_tensor():
    dispatch.adapter_backend(FakeCuda(), torch.zeros(1, dtype=torch.float64))


def test_kernels_on_the_device(kernels):
    _layer(kernels.device)(torch.randn(3, 8, device=kernels.device))


def test_each_backend_on_the_device(backend):
    _layer(DEVICE)(torch.randn(3, 8, device=DEVICE))


def test_automatic_choice_on_cpu_tensors():
    _layer()(torch.randn(3, 8))


@pytest.mark.automatic_dispatch
def test_marked_automatic_choice_on_device_tensors():
    _layer(DEVICE)(torch.randn(3, 8, device=DEVICE))


@pytest.mark.allows_fallback
def test_marked_fallback_on_a_cuda_tensor():
    dispatch.adapter_backend(FakeCuda(), torch.zeros(1, dtype=torch.float64))
'''

# case -> the guard's words in its failure (None: the case passes)
EXPECTED = {
    # on a GPU the dispatcher itself refuses CPU tensors with the kernels forced
    "test_forced_backend_on_cpu_tensors": "the Triton backend cannot run" if ON_GPU else "without the `kernels` fixture",
    "test_automatic_choice_on_device_tensors": "chose the adapter's backend automatically",
    "test_kernels_fixture_without_a_kernel": "launched no kernel",
    "test_fallback_on_a_cuda_tensor": "a CUDA call fell back to the reference",
    "test_kernels_on_the_device": None,
    "test_each_backend_on_the_device[reference]": None,
    "test_each_backend_on_the_device[triton]": None,
    "test_automatic_choice_on_cpu_tensors": None,
    "test_marked_automatic_choice_on_device_tensors": None,
    "test_marked_fallback_on_a_cuda_tensor": None,
}


def test_the_guards_fail_exactly_the_tests_they_exist_for(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(CASES))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "ADALORA_FAST_BACKEND"))}
    junit = tmp_path / "cases.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                    f"--junitxml={junit}", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, timeout=300)  # fmt: skip
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        problems = [el.get("message", "") + (el.text or "") for el in case if el.tag in ("failure", "error")]
        outcomes[case.get("name")] = " ".join(problems) or None
    assert set(outcomes) == set(EXPECTED), sorted(outcomes)
    for name, words in EXPECTED.items():
        if words is None:
            assert outcomes[name] is None, f"{name} should pass: {outcomes[name]}"
        else:
            assert outcomes[name] is not None and words in outcomes[name], f"{name}: {outcomes[name]}"


def test_every_long_running_entry_still_names_a_test():
    """tests/conftest.py starts the long tests first; an entry whose test was renamed matches nothing, and that
    test starts wherever collection puts it (last, it sets the run's wall time)."""
    tree = ast.parse(open(os.path.join(TESTS, "conftest.py")).read())
    (entries,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "LONG_RUNNING" for t in node.targets)]  # fmt: skip
    sources = {path: open(path).read() for folder in ("tests", "benchmarks")
               for path in glob.glob(os.path.join(ROOT, folder, "test_*.py"))}  # fmt: skip
    for entry in entries:
        named = [path for path, text in sources.items()
                 if os.path.basename(path) == entry or re.search(rf"^def {re.escape(entry)}", text, re.M)]  # fmt: skip
        assert named, f"LONG_RUNNING names {entry!r}, which is no test file or test function here"
