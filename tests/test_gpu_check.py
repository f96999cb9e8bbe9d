"""scripts/gpu_check.sh and its summary: always a SUMMARY.md whose first screen names what passed, what failed,
what is missing and what ran on the kernels, within a time budget whose arithmetic holds.

On a CPU the script runs its smoke mode (small benchmark shapes, the tests given to it): that is the whole
script, requirements, stages and time limits included, in about a minute. Its failure modes are simulated:
a broken compiler (CXX=/bin/false) for a failed extension build, and a folder on PYTHONPATH that shadows a
requirement (a peft that fails to import, setuptools metadata of version 60) for a missing one.
"""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check_plugin  # noqa: E402
import gpu_summary  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
LEASE_CAP_S = 480  # the check's whole budget, Triton's cache cold: 8 of a lease's 15 minutes

TESTS = '''
def test_that_passes():
    assert True

def test_that_fails():
    assert 1 == 2, "one is not two"

def test_that_dispatches(benchmark):
    import torch
    from adalora_fast import dispatch
    benchmark(lambda: dispatch.adapter_backend(torch.randn(2, 3)))
'''

# The script's own runs: on a GPU it runs its real stages (run it directly), and the CPU suite has these.
runs_the_script = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its real stages")


def _editable_from_this_checkout() -> bool:
    try:
        url = json.loads(md.distribution("adalora-fast").read_text("direct_url.json") or "{}")
    except md.PackageNotFoundError:
        return False
    return url.get("dir_info", {}).get("editable", False) and url.get("url") == f"file://{ROOT}"


def _run_check(tmp_path, stages, *, what=(), **env):
    """The script as a fresh machine runs it, on the stages named; (exit status, SUMMARY.md, stdout, logs)."""
    results, logs = tmp_path / "results", tmp_path / "logs"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "PYTEST_XDIST_"))}
    env = dict(inherited, RESULTS=str(results), GPU_CHECK_LOGS=str(logs), GPU_CHECK_QUICK="1", PYTHON=sys.executable,
               GPU_CHECK_STAGES=stages, **env)  # fmt: skip
    proc = subprocess.run(["bash", SCRIPT, *what], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return proc.returncode, (results / "SUMMARY.md").read_text(), proc.stdout, logs


def _first_screen(summary: str) -> str:
    return "\n".join(summary.splitlines()[: gpu_summary.FIRST_SCREEN])


@runs_the_script
@pytest.mark.skipif(not _editable_from_this_checkout(), reason="the check would install the package: not editable here")
def test_the_check_goes_on_past_a_failed_extension_build_and_names_what_failed(tmp_path):
    """The extension's build fails (a compiler that fails): the top of SUMMARY.md says so, and the tests and the
    layer benchmark run on; the first screen names the failed test and what the adapter ran on."""
    tests = tmp_path / "test_three.py"
    tests.write_text(TESTS)
    # The stages on the smallest cases (the training step and the profile build models: left out here).
    status, summary, stdout, logs = _run_check(
        tmp_path, "build env tests bench_layer report", CXX="/bin/false", GPU_CHECK_TESTS=str(tests),
        GPU_CHECK_LAYER_K="300x77x130-0.0 and forward and not backward and (frozen or adalora_fast-)")  # fmt: skip
    assert status == 1, "a failing test (and the failed build) must fail the check"
    head = summary.splitlines()
    assert head[2].startswith("**The extension did not build** (failed (exit 1): ") and "/bin/false" in head[2], summary
    first = _first_screen(summary)
    stages = next(line for line in first.splitlines() if line.startswith("Stages: "))
    for stage in ("preflight ok", "build failed", "env ok", "tests failed", "bench_layer ok", "report ok"):
        assert stage in stages, (stage, stages, stdout[-3000:])
    # (the node id is pytest's, relative to the rootdir it picks: with a path prefix where tmp_path and the
    # checkout share an ancestor below /)
    assert re.search(r"^- `([^`]*/)?test_three\.py::test_that_fails`: AssertionError: one is not two", first, re.M), first
    # What the adapter ran on, in the tests (the dispatching test) and in the fast layer's benchmark.
    assert "Kernels ran — tests: adapter reference 1 call in 1 test" in first
    assert re.search(r"Kernels ran — benchmarks .*: adalora_fast reference \d+", first)
    assert re.search(r"\| 300×77→130, 0\.0 \| [\d.]+ \| — / — / \*\*[\d.]+\*\* \| — \| reference \d+ \|", first)
    assert "bench_step" not in summary and "Profile:" not in summary
    assert "1 failed, 4 passed." in summary and "test_three.py 2" in summary
    records = [json.loads(line) for line in (logs / "tests.jsonl").read_text().splitlines()]
    (dispatched,) = [r for r in records if r["kind"] == "bench"]
    assert dispatched["calls"]["svd_adapter"] == {"reference": 1} == dispatched["extra_info"]["calls"]["svd_adapter"]
    (passed,) = [r for r in records if r["kind"] == "test" and r["nodeid"].endswith("dispatches")]
    assert passed["calls"]["svd_adapter"] == {"reference": 1}  # (from the xdist worker, through its report)
    names = tarfile.open(tmp_path / "results" / "gpu-check-logs.tar.gz").getnames()
    assert any(n.endswith("tests.log") for n in names) and any(n.endswith("tests.xml") for n in names)
    assert sorted(os.listdir(tmp_path / "results")) == ["BENCHMARKS-section.md", "SUMMARY.md", "bench.json",
                                                        "gpu-check-logs.tar.gz"]  # fmt: skip


def _shadow(tmp_path, *, old_setuptools=False):
    """A folder for PYTHONPATH that makes peft fail to import (and, asked for, setuptools look like 60.0)."""
    shadow = tmp_path / "shadow"
    (shadow / "peft").mkdir(parents=True)
    (shadow / "peft" / "__init__.py").write_text('raise ImportError("peft is broken here")\n')
    if old_setuptools:
        (shadow / "setuptools-60.0.dist-info").mkdir()
        (shadow / "setuptools-60.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: setuptools\nVersion: 60.0\n")
    return str(shadow)


@runs_the_script
def test_a_missing_requirement_skips_what_needs_it(tmp_path):
    status, summary, _, _ = _run_check(tmp_path, "bench_step", PYTHONPATH=_shadow(tmp_path))
    assert status == 1
    assert summary.splitlines()[2] == ("**Missing: peft (import failed: ImportError: peft is broken here).** The stages "
                                       "that need what is missing were skipped (below).")  # fmt: skip
    assert "Stages: preflight ok (" in summary and "bench_step skipped (0 s) — needs peft" in summary


@runs_the_script
def test_missing_essentials_stop_the_check_at_once_and_every_one_is_named(tmp_path):
    status, summary, stdout, _ = _run_check(tmp_path, "build env tests", PYTHONPATH=_shadow(tmp_path, old_setuptools=True))
    assert status == 3
    assert summary.splitlines()[2].startswith(
        "**Missing: setuptools>=64 (version 60.0), peft (import failed: ImportError: peft is broken here).** The check stopped")
    assert "Stages: preflight failed (exit 3)" in summary and "build" not in summary.split("Stages:")[1]
    assert "missing: setuptools>=64 (version 60.0), peft (import failed: ImportError: peft is broken here) — stopping" in stdout


def test_the_stage_shares_add_up_to_the_budget_and_every_stage_has_one():
    """The budget arithmetic: each stage ends by the sum of the shares up to it, so the shares and the summary's
    reserve must fit the budget, and the budget a lease."""
    out = subprocess.run(["bash", SCRIPT, "budget"], capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = dict(line.split() for line in out.stdout.splitlines())
    shares = {name: int(s) for name, s in rows.items() if name not in ("reserve", "sum", "budget")}
    assert sum(shares.values()) + int(rows["reserve"]) == int(rows["sum"]) <= int(rows["budget"]) <= LEASE_CAP_S
    # Every stage the script runs has a share, but the opt-in rest of the suite (the budget's leftover).
    with open(SCRIPT) as f:
        run = re.findall(r"^\s*(?:\w+=\S+ )*stage (\w+) ", f.read(), flags=re.M)
    assert set(run) - {"tests_rest"} == set(shares) and "tests_rest" in run
    # And a budget below the shares' sum is refused.
    low = subprocess.run(["bash", SCRIPT, "budget"], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "GPU_CHECK_BUDGET": "300"})  # fmt: skip
    assert low.returncode == 1


def test_calls_between_counter_readings():
    before = {"svd_adapter": {"triton": 5, "reference": 2}, "orth_penalty": {"extension": 1}}
    after = {"svd_adapter": {"triton": 9, "reference": 2}, "orth_penalty": {"extension": 1}, "kernel_launches": {"direct": 3}}
    assert gpu_check_plugin.calls_between(before, after) == {"svd_adapter": {"triton": 4}, "kernel_launches": {"direct": 3}}
    restarted = {"svd_adapter": {"triton": 1}}  # a counter that went down: what ran since it started again
    assert gpu_check_plugin.calls_between(before, restarted) == {"svd_adapter": {"triton": 1}}


def test_a_test_that_resets_the_counters_still_has_its_calls_counted(monkeypatch):
    from adalora_fast import dispatch

    counters = gpu_check_plugin._Counters()
    monkeypatch.setattr(dispatch, "reset_backend_calls", dispatch.reset_backend_calls)  # (the plugin wraps it)
    x = torch.randn(2, 3)
    dispatch.adapter_backend(x)  # (an earlier test's call)
    before = counters.read()
    dispatch.reset_backend_calls()  # as a benchmark does before it times, then as many calls as before it
    dispatch.adapter_backend(x)
    assert gpu_check_plugin.calls_between(before, counters.read())["svd_adapter"] == {"reference": 1}


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _gpu_logs(tmp_path, n_failed=2):
    """A logs folder as an H200 run leaves it: a failed extension build, a test timeout, every table."""
    (tmp_path / "stages.tsv").write_text("preflight\tok\t4\t\nbuild\tfailed (exit 1)\t41\t\ntests\ttimeout\t170\t\n"
                                         "profile\tskipped\t0\tno time left\n")  # fmt: skip
    (tmp_path / "build.log").write_text("ninja: build stopped\nerror: command '/usr/bin/nvcc' failed with exit code 1\n"
                                        "adalora_fast._C: not loaded (ImportError: no _C)\n")  # fmt: skip
    (tmp_path / "extension.txt").write_text("not loaded (ImportError: cannot import name '_C')\n")
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda_available": True,
                                                   "svd_adapter": "triton", "orth_penalty": "reference"}))  # fmt: skip
    tests = [
        {"kind": "test", "nodeid": "tests/test_a.py::test_ok", "outcome": "passed", "when": "call", "message": "",
         "calls": {"svd_adapter": {"triton": 40}, "kernel_launches": {"direct": 100, "triton": 20}}},
        {"kind": "test", "nodeid": "tests/test_a.py::test_ref", "outcome": "passed", "when": "call", "message": "",
         "calls": {"svd_adapter": {"reference": 3}, "orth_penalty": {"reference": 2}}},
        {"kind": "test", "nodeid": "tests/test_b.py::test_skip", "outcome": "skipped", "when": "setup", "message": ""},
    ] + [{"kind": "test", "nodeid": f"tests/test_c.py::test_fails_{i:02d}", "outcome": "failed", "when": "call",
          "message": f"failure {i}"} for i in range(n_failed)]  # fmt: skip
    tests[-1]["message"] = "worker 'gw1' crashed while running 'tests/test_c.py::test_crash'"
    _write_jsonl(tmp_path / "tests.jsonl", tests)
    group = "training step llama_1b 8x512 tokens dropout=0.0 bfloat16"
    medians = {"peft_lora": 0.136, "peft_adalora": 0.35, "adalora_fast": 0.19, "peft_lora_graph": 0.12, "adalora_fast_graph": 0.15}
    benches = [{"kind": "bench", "nodeid": f"benchmarks/test_bench_training_step.py::test_training_step[{p}]", "group": group,
                "params": {"provider": p}, "median_s": m, "extra_info": {"peak_memory_gib": 14.7},
                "calls": {"svd_adapter": {"triton": 1540}, "orth_penalty": {"reference": 20}} if "fast" in p else {}}
               for p, m in medians.items()]  # fmt: skip
    for mode, times in (("forward", (0.377e-3, 0.51e-3, 0.62e-3, 0.6e-3)), ("forward_backward", (1.1e-3, 1.5e-3, 2.3e-3, 2.1e-3))):
        g = f"svd_linear {mode} 8192x4096->4096 r=12 dropout=0.0 bfloat16"
        benches += [{"kind": "bench", "nodeid": f"benchmarks/test_bench_svd_linear.py::test_svd_linear_layer[{p}-{mode}]",
                     "group": g, "params": {"provider": p}, "median_s": t, "extra_info": {},
                     "calls": {"svd_adapter": {"triton": 22}} if p == "adalora_fast" else {}}
                    for p, t in zip(("frozen_linear", "peft_lora", "peft_svdlinear", "adalora_fast"), times)]  # fmt: skip
    benches.append({"kind": "bench", "nodeid": "benchmarks/test_bench_adapter_kernels.py::test_fwd[8192x4096x4096]",
                    "group": "adapter forward kernels 8192x4096->4096 r=12 bf16", "params": {}, "median_s": 1e-4,
                    "extra_info": {"gbps": 2400.0, "peak_gbps": 4800.0, "fraction_of_peak": 0.5}})  # fmt: skip
    _write_jsonl(tmp_path / "bench_step.jsonl", benches)
    with open(tmp_path / "bench_step.jsonl", "a") as f:
        f.write('{"kind": "bench", "group": "cut')  # a record cut by a kill is skipped
    return str(tmp_path)


def test_summary_first_screen_from_gpu_records(tmp_path):
    text = gpu_summary.summary(_gpu_logs(tmp_path))
    lines = text.splitlines()
    assert lines[0].startswith("# GPU check: NVIDIA H200")
    assert lines[2] == ("**The extension did not build** (failed (exit 1): `error: command '/usr/bin/nvcc' failed with "
                        "exit code 1`, build.log). adalora_fast._C: not loaded (ImportError: cannot import name '_C'). "
                        "The library runs without it (its ops fall back to the PyTorch reference, with a warning): the "
                        "tests that need it fail by name below; the kernels' tests and the benchmarks still ran.")  # fmt: skip
    first = _first_screen(text)
    assert "build failed (exit 1) (41 s)" in first and "tests timeout (170 s)" in first
    assert "profile skipped (0 s) — no time left" in first
    assert ("Kernels ran — tests: adapter reference 3 calls in 1 test, triton 40 calls in 1 test; penalty reference 2; "
            "120 Triton launches.") in first  # fmt: skip
    assert "adalora_fast triton 1 584 · adalora_fast_graph triton 1 540" in first
    assert "| 8192×4096→4096, 0.0 | 0.377 | 1.35 / 1.64 / **1.59** | 1.36 / 2.09 / **1.91** | triton 44 |" in first
    assert "| adalora_fast | 190.0 | 1.40× | 14.7 | adapter triton 1 540; penalty reference 20 |" in first
    assert "| peft_adalora | 350.0 | 2.57× | 14.7 | PEFT |" in first and "| adalora_fast_graph | 150.0 | 1.10× |" in first
    assert "## Failed tests (2 of 5)" in first and "`tests/test_c.py::test_fails_01` **(crashed)**" in first
    assert "- adapter forward kernels 8192x4096->4096 r=12 bf16: 2400 GB/s, 50% of 4800" in text
    assert "2 failed, 2 passed, 1 skipped." in text


def test_summary_names_every_failed_test_and_keeps_the_tables_on_the_first_screen(tmp_path):
    text = gpu_summary.summary(_gpu_logs(tmp_path, n_failed=30))
    first = _first_screen(text)
    assert "| adalora_fast_graph | 150.0 |" in first and "## Failed tests (30 of 33)" in first
    shown = re.findall(r"^- `tests/test_c\.py::(test_fails_\d+)`", first, flags=re.M)
    rest = re.search(r"^- … and (\d+) more: (.*)$", first, flags=re.M)
    assert shown and rest and len(shown) + int(rest.group(1)) == 30
    assert all(f"`tests/test_c.py::test_fails_{i:02d}`" in rest.group(2) for i in range(len(shown), 30))


def test_merge_benchmark_json(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine_info": {"x": 1}, "benchmarks": [{"name": "a"}]}))
    b.write_text(json.dumps({"machine_info": {"x": 2}, "benchmarks": [{"name": "b"}]}))
    assert gpu_summary.main(["merge", str(a), str(b), str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.json")]) == 0
    merged = json.loads((tmp_path / "c.json").read_text())
    assert [x["name"] for x in merged["benchmarks"]] == ["a", "b"] and merged["machine_info"] == {"x": 1}
