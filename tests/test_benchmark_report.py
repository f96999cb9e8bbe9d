"""The benchmark report script turns pytest-benchmark JSON into a table of ratios measured in one run."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report_module():
    return _script("report")


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


def _bench(group, provider, median, **extra):
    return {"group": group, "params": {"provider": provider}, "stats": {"median": median}, "extra_info": extra}


def test_report_tables_and_plots_the_ranks_steps_and_token_sweep(tmp_path):
    ranks = {f"bert.encoder.layer.{layer}.{m}": layer + i for layer in range(3)
             for i, m in enumerate(["attention.self.query", "output.dense"])}  # fmt: skip
    data = {"machine_info": {"gpu": "test gpu"}, "benchmarks": [
        _bench("rank_allocation minilm", "peft_lora", 1.0),
        _bench("rank_allocation minilm", "adalora_fast", 1.1, ranks=ranks),
        *[_bench(f"training step {m} 8x512 tokens dropout={d} bfloat16", p, t)
          for m in ("llama_160m", "llama_1b") for d in (0.0, 0.1)
          for p, t in (("peft_lora", 1.0), ("peft_adalora", 2.2), ("adalora_fast", 0.95))],
        *[_bench(f"svd_linear forward_backward {n}x4096->4096 r=12 dropout=0.0 bfloat16", p, t * n)
          for n in (1024, 8192) for p, t in (("frozen_linear", 1.0), ("adalora_fast", 1.2))],
    ]}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out, plots = tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    _report_module().main([str(path), "--out", str(out), "--plots", str(plots)])
    text = out.read_text()
    assert "| matrix | layer 0 | layer 1 | layer 2 |" in text
    assert "| attention.self.query | 0 | 1 | 2 |" in text and "| output.dense | 1 | 2 | 3 |" in text
    assert "ranks=" not in text  # the rank dict goes to its own table, not the extras column
    for name in ("rank_heatmap.png", "training_step_by_model.png", "layer_by_tokens.png", "training.png"):
        assert (plots / name).stat().st_size > 1000, name


def test_rank_grid_reads_layer_and_matrix_from_module_names():
    layers, matrices, grid = _report_module().rank_grid(
        {"model.layers.10.mlp.up_proj": 3, "model.layers.2.self_attn.q_proj": 5, "model.layers.2.mlp.up_proj": 1}
    )
    assert layers == [2, 10] and matrices == ["mlp.up_proj", "self_attn.q_proj"]
    assert grid == [[1, 3], [5, 0]]


def test_profile_step_reports_every_provider(tmp_path):
    """The profiler script on a tiny model (on a CPU there is no device time: the rows are still written)."""
    out = tmp_path / "profile.md"
    _script("profile_step").main(["--model", "tiny", "--providers", "peft_lora,adalora_fast", "--steps", "1",
                                  "--batch", "1", "--seq", "8", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "## Profile: tiny, 1x8 tokens" in text
    rows = [line for line in text.splitlines() if line.startswith(("| peft_lora |", "| adalora_fast |"))]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)  # wall ms per step
