"""The benchmark report script turns pytest-benchmark JSON into a table of ratios measured in one run."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report_module():
    spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "benchmarks", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_writes_ratios_to_the_group_baseline(tmp_path):
    data = {"machine_info": {"cpu": {"brand_raw": "test cpu"}}, "benchmarks": [
        {"group": "svd_linear fwd", "params": {"provider": "frozen_linear"}, "stats": {"median": 0.002}},
        {"group": "svd_linear fwd", "params": {"provider": "adalora_fast"}, "stats": {"median": 0.0022}, "extra_info": {}},
        {"group": "training step x", "params": {"provider": "peft_lora"}, "stats": {"median": 0.1}},
        {"group": "training step x", "params": {"provider": "adalora_fast"}, "stats": {"median": 0.09},
         "extra_info": {"peak_memory_gib": 1.5}},
    ]}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    _report_module().main([str(path), "--out", str(out), "--command", "pytest benchmarks/"])
    text = out.read_text()
    assert "test cpu" in text and "`pytest benchmarks/`" in text
    assert "| svd_linear fwd | adalora_fast | 2.200 | 1.10× |" in text
    assert "| training step x | adalora_fast | 90.000 | 0.90× | peak_memory_gib=1.5 |" in text
