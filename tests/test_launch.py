"""CachedLauncher (adalora_fast.kernels.launch): the same launches as ``kernel[grid](...)``, fewer host steps.

Triton's compiled launch path is checked without a GPU on the fake CUDA driver, in a subprocess
(tests/launch_checks.py: the conftest runs this process under the interpreter). In-process, the launcher
must give the results of ``kernel[grid]``: under the interpreter by being that call, on a GPU by launching
the same compiled kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from adalora_fast.kernels import launch
from adalora_fast.kernels.launch import CachedLauncher

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CHECKS = os.path.join(os.path.dirname(__file__), "launch_checks.py")
CHECK_NAMES = [
    "check_direct_calls_go_to_the_lowest_launch_call",
    "check_jit_same_launch_and_specialization_misses",
    "check_launch_hooks_and_metadata",
    "check_grid_callable_sees_the_meta_parameters",
    "check_autotuned_restore_value_tunes_once_per_key",
    "check_switch_off_means_plain_launches",
    "check_bound_launch_replays_the_same_launch",
    "check_programs_replay_the_same_launches",
    "check_add_programs_replay_the_same_launches",
    "check_program_node_computes_the_frozen_layer_as_the_python_path",
    "check_program_node_takes_hooked_tensors_and_draws_one_seed",
]


# python: the fake driver's launcher stands in for the C launch; native: Triton's own C launcher runs against the
# fake driver's stub libcuda (not beside a real CUDA driver, nor without a C compiler).
MODES = ["python", pytest.param("native", marks=pytest.mark.skipif(
    CUDA or shutil.which(os.environ.get("CC") or "gcc") is None and shutil.which("cc") is None,
    reason="the stub libcuda is for machines without a CUDA driver, with a C compiler"))]


@pytest.fixture(scope="module", params=MODES)
def fake_driver_results(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, CHECKS] + (["--native"] if request.param == "native" else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["native"] == (request.param == "native")
    return results


def test_the_installed_triton_takes_the_direct_path(fake_driver_results):
    assert fake_driver_results["supported"], f"Triton {fake_driver_results['triton']} is not a verified version"


@pytest.mark.parametrize("check", CHECK_NAMES)
def test_fake_driver_launch_path(fake_driver_results, check):
    assert check in fake_driver_results, sorted(fake_driver_results)
    assert fake_driver_results[check] is None, fake_driver_results[check]


@triton.jit
def _axpy(X, Y, OUT, N, a, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + i, a * tl.load(X + i, mask=i < N) + tl.load(Y + i, mask=i < N), mask=i < N)


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The path the launcher must take here, from the environment, not from the launcher's own decision: compiled
# Triton (a verified version: test_the_installed_triton_takes_the_direct_path) launches directly unless
# switched off; the interpreter runs every call as kernel[grid].
DIRECT_EXPECTED = not INTERPRETING and os.environ.get(launch.ENV, "1") != "0"
# The interpreter has no benchmarker: one config there, as in the package's kernels.
_CONFIGS = [triton.Config({"BLOCK": 32})] + ([] if INTERPRETING else [triton.Config({"BLOCK": 64})])
_axpy_tuned = triton.autotune(_CONFIGS, key=["N"])(_axpy)


def _grid(meta):
    return (triton.cdiv(meta["N"], meta["BLOCK"]),)


@pytest.mark.parametrize("tuned", [False, True])
def test_same_results_as_kernel_grid(tuned):
    kernel = _axpy_tuned if tuned else _axpy
    kwargs = {} if tuned else {"BLOCK": 32}
    launcher = CachedLauncher(kernel)
    sizes = (100, 128) if INTERPRETING else (100, 128, 1)  # (1: an int Triton compiles in as a constant)
    for n in sizes:
        x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
        ref, got = torch.empty_like(x), torch.empty_like(x)
        kernel[_grid](x, y, ref, n, 0.5, **kwargs)
        for _ in range(2):  # the first call fills the cache, the second launches directly
            got.zero_()
            launcher(_grid, x, y, got, n, 0.5, **kwargs)
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    counts = launcher.counts()
    if DIRECT_EXPECTED:  # each size: the first call fills the cache through Triton's path, the second is direct
        assert counts == {"direct": len(sizes), "triton": len(sizes), "plain": 0}
    else:
        assert counts == {"direct": 0, "triton": 0, "plain": 2 * len(sizes)}


def test_interpreter_means_plain_launches():
    if not INTERPRETING:
        pytest.skip("runs where the suite runs the interpreter")
    assert not launch.triton_supported()
    launcher = CachedLauncher(_axpy)
    x = torch.randn(8)
    out = torch.empty_like(x)
    launcher((1,), x, x, out, 8, 1.0, BLOCK=8)
    assert launcher.counts()["plain"] == 1
    torch.testing.assert_close(out, 2 * x)


def test_launch_counts_add_up():
    launch.reset_counts()
    first, second = CachedLauncher(_axpy), CachedLauncher(_axpy)
    x = torch.randn(16, device=DEVICE)
    first((1,), x, x, torch.empty_like(x), 16, 1.0, BLOCK=16)
    for _ in range(2):
        second((1,), x, x, torch.empty_like(x), 16, 1.0, BLOCK=16)
    assert sum(first.counts().values()) == 1 and sum(second.counts().values()) == 2
    # every launcher's calls by path, and only these two's: the others were reset and have not launched since
    # (nor has a launch program)
    expected = {path: n + second.counts()[path] for path, n in first.counts().items()}
    assert launch.launch_counts() == {**expected, "program": 0}


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a GPU")
def test_direct_launch_is_captured_by_a_cuda_graph():
    launcher = CachedLauncher(_axpy)
    n = 4096
    x, y, out = (torch.randn(n, device="cuda") for _ in range(3))
    launcher(_grid, x, y, out, n, 2.0, BLOCK=256)  # the entry, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        launcher(_grid, x, y, out, n, 2.0, BLOCK=256)  # warm on the side stream
    stream.synchronize()
    with torch.cuda.graph(graph):
        launcher(_grid, x, y, out, n, 2.0, BLOCK=256)
    out.zero_()
    x.copy_(torch.randn(n, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2.0 * x + y, rtol=0, atol=0)
    assert launcher.counts()["direct"] >= 2
