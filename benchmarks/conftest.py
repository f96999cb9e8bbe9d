"""Benchmark configuration: ratios to a baseline, printed for every group measured in this run.

``pytest benchmarks/ --benchmark-only`` measures; ``--benchmark-disable`` runs
each case once as a smoke test (as CI does). pytest-benchmark's own table has
absolute times; the table added here divides each provider's median by the
median of the group's baseline (the frozen ``nn.Linear`` for layers, PEFT's
per-matrix loop for the penalty), measured in the same run. The JSON's
``machine_info`` also records the GPU, the versions and the backend each op
ran on, for benchmarks/report.py.
"""

from collections import defaultdict

import torch

from bench_common import ratios_to_baseline


def pytest_benchmark_update_machine_info(config, machine_info):
    """The device, the library versions and the backends, beside pytest-benchmark's CPU and Python details."""
    import importlib.metadata

    import adalora_fast

    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
    versions = {}
    for package in ("adalora-fast", "torch", "triton", "peft", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["torch"] = torch.__version__  # (with its CUDA or CPU tag)
    machine_info["versions"] = versions
    report = adalora_fast.env_report()
    machine_info["backends"] = {op: report[op] for op in ("svd_adapter", "orth_penalty") if op in report}


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        provider = bench.params.get("provider") if bench.params else None
        if provider is not None:
            groups[bench.group][provider] = bench.stats.median
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    terminalreporter.write_sep("-", f"median time relative to the group's baseline (same run, {device})")
    for group, medians in sorted(groups.items()):
        baseline, ratios = ratios_to_baseline(medians)
        if baseline is None:
            continue
        cells = "  ".join(f"{p} {ratio:.2f}x" for p, ratio in sorted(ratios.items()))
        terminalreporter.write_line(f"{group}: {cells}")
