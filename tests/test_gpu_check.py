"""scripts/gpu_check.sh and its summary: always a SUMMARY.md that names what passed and what failed.

On a CPU the script runs its smoke mode (small benchmark shapes, a tiny profiled model, the tests given to
it), without building: that is the whole script, stages and time limits included, in well under a minute.
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_summary  # noqa: E402

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its real stages; run it directly")
def test_the_check_writes_a_summary_naming_passed_and_failed_tests(tmp_path):
    tests = tmp_path / "test_three.py"
    tests.write_text(TESTS)
    results, logs = tmp_path / "results", tmp_path / "logs"
    # The stages, on the smallest cases (the training step and the profile build models: skipped here).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "PYTEST_XDIST_"))}
    env = dict(inherited, RESULTS=str(results), GPU_CHECK_LOGS=str(logs), GPU_CHECK_SKIP_BUILD="1",
               GPU_CHECK_QUICK="1", GPU_CHECK_TESTS=str(tests), GPU_CHECK_BUDGET="300", PYTHON=sys.executable,
               GPU_CHECK_STAGES="build env tests bench_layer report",
               GPU_CHECK_LAYER_K="300x77x130-0.0 and forward and not backward and (frozen or adalora_fast-)")  # fmt: skip
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0, "a failing test must fail the check"
    summary = (results / "SUMMARY.md").read_text()
    assert "test_three.py::test_that_fails" in summary and "one is not two" in summary
    assert "2 passed" in summary and "1 failed" in summary and "test_three.py 2" in summary
    for stage in ("build ok", "env ok", "tests failed", "bench_layer ok", "report ok"):
        assert stage in summary, (stage, summary, proc.stdout[-3000:])
    assert "bench_step" not in summary and "Profile:" not in summary
    assert "| 300×77→130, 0.0 |" in summary and "adapter reference" in summary  # the fast layer's backend
    # The plugin counts the dispatcher's decisions in every benchmark (here: the test stage's one).
    records = [json.loads(line) for line in (logs / "tests.jsonl").read_text().splitlines()]
    (dispatched,) = [r for r in records if r["kind"] == "bench"]
    assert dispatched["extra_info"]["backends"]["adapter"]["reference"] >= 1
    assert len(summary.splitlines()) < 80
    names = tarfile.open(results / "gpu-check-logs.tar.gz").getnames()
    assert any(n.endswith("tests.log") for n in names) and any(n.endswith("tests.xml") for n in names)
    assert sorted(os.listdir(results)) == ["BENCHMARKS-section.md", "SUMMARY.md", "bench.json", "gpu-check-logs.tar.gz"]


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_summary_tables_from_gpu_records(tmp_path):
    (tmp_path / "stages.tsv").write_text("build\tok\t41\t\ntests\ttimeout\t170\t\nprofile\tskipped\t0\tno time left\n")
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130",
                                                   "svd_adapter": "triton", "orth_penalty": "extension (CUDA)"}))  # fmt: skip
    tests = [
        {"kind": "test", "nodeid": "tests/test_a.py::test_ok", "outcome": "passed", "when": "call", "message": ""},
        {"kind": "test", "nodeid": "tests/test_a.py::test_crash", "outcome": "failed", "when": "call",
         "message": "worker 'gw1' crashed while running 'tests/test_a.py::test_crash'"},
        {"kind": "test", "nodeid": "tests/test_b.py::test_setup", "outcome": "error", "when": "setup", "message": "boom"},
        {"kind": "test", "nodeid": "tests/test_b.py::test_skip", "outcome": "skipped", "when": "setup", "message": ""},
    ]  # fmt: skip
    _write_jsonl(tmp_path / "tests.jsonl", tests)
    group = "training step llama_1b 8x512 tokens dropout=0.0 bfloat16"
    medians = {"peft_lora": 0.136, "peft_adalora": 0.35, "adalora_fast": 0.19, "peft_lora_graph": 0.12, "adalora_fast_graph": 0.15}
    benches = [{"kind": "bench", "group": group, "params": {"provider": p}, "median_s": m,
                "extra_info": {"peak_memory_gib": 14.7, "backends": {"adapter": {"triton": 10}} if "fast" in p else {}}}
               for p, m in medians.items()]  # fmt: skip
    for mode, frozen, stock, fast in (("forward", 0.377e-3, 0.62e-3, 0.6e-3), ("forward_backward", 1.1e-3, 2.3e-3, 2.1e-3)):
        g = f"svd_linear {mode} 8192x4096->4096 r=12 dropout=0.0 bfloat16"
        benches += [{"kind": "bench", "group": g, "params": {"provider": p}, "median_s": t, "extra_info": {}}
                    for p, t in (("frozen_linear", frozen), ("peft_svdlinear", stock), ("adalora_fast", fast))]  # fmt: skip
    _write_jsonl(tmp_path / "bench_step.jsonl", benches)
    with open(tmp_path / "bench_step.jsonl", "a") as f:
        f.write('{"kind": "bench", "group": "cut')  # a record cut by a kill is skipped
    text = gpu_summary.summary(str(tmp_path))
    assert "NVIDIA H200" in text and "build ok (41 s)" in text and "tests timeout (170 s)" in text
    assert "profile skipped (0 s) — no time left" in text
    assert "1 error, 1 failed, 1 passed, 1 skipped" in text
    assert "`tests/test_a.py::test_crash` **(crashed)**" in text and "`tests/test_b.py::test_setup`" in text
    assert "| adalora_fast | 190.0 | 1.40× | 14.7 | adapter triton |" in text
    assert "| adalora_fast_graph | 150.0 | 1.10× |" in text
    assert "| 8192×4096→4096, 0.0 | 0.377 | 1.64 / **1.59** | 2.09 / **1.91** |" in text


def test_merge_benchmark_json(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine_info": {"x": 1}, "benchmarks": [{"name": "a"}]}))
    b.write_text(json.dumps({"machine_info": {"x": 2}, "benchmarks": [{"name": "b"}]}))
    assert gpu_summary.main(["merge", str(a), str(b), str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.json")]) == 0
    merged = json.loads((tmp_path / "c.json").read_text())
    assert [x["name"] for x in merged["benchmarks"]] == ["a", "b"] and merged["machine_info"] == {"x": 1}
