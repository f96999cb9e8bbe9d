"""The benchmark report script turns pytest-benchmark JSON into a table of ratios measured in one run."""

import importlib.util
import json
import os

import pytest

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
         "extra_info": {"peak_memory_gib": 1.5, "calls": {"svd_adapter": {"triton": 30, "reference": 2},
                                                          "kernel_launches": {"direct": 90}}}},
        {"group": "training step x", "params": {"provider": "peft_adalora"}, "stats": {"median": 0.2},
         "extra_info": {"calls": {}, "peak_gbps": None}},
    ]}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    _report_module().main([str(path), "--out", str(out), "--command", "pytest benchmarks/"])
    text = out.read_text()
    assert "test cpu" in text and "`pytest benchmarks/`" in text
    assert "| svd_linear fwd | adalora_fast | 2.200 | 1.10× |" in text
    assert ("| training step x | adalora_fast | 90.000 | 0.90× | peak_memory_gib=1.5, calls=kernel_launches direct 90; "
            "svd_adapter reference 2 + triton 30 |") in text  # (the benchmark plugin's calls, compactly)
    assert "| training step x | peft_adalora | 200.000 | 2.00× |  |" in text  # empty extras left out


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


def _drawn_providers(fig):
    """[(axes, provider, colour as hex)] for every bar and line a figure draws under a provider's label."""
    from matplotlib.colors import to_hex

    drawn = []
    for ax in fig.axes:
        for container in ax.containers:
            drawn += [(ax, container.get_label(), to_hex(patch.get_facecolor())) for patch in container.patches]
        for line in ax.get_lines():
            if not line.get_label().startswith("_") and "(= 1)" not in line.get_label():  # not the baseline's line
                drawn.append((ax, line.get_label(), to_hex(line.get_color())))
    return drawn


def _groups_for_every_plot():
    """Benchmark groups that make every plot, with a different subset and order of providers per panel."""
    groups = {}
    for mode, providers in (("forward", ("frozen_linear", "adalora_fast", "peft_svdlinear")),
                            ("forward_backward", ("frozen_linear", "adalora_fast_emit", "peft_svdlinear", "adalora_fast"))):  # fmt: skip
        for n in (1024, 4096, 8192):
            groups[f"svd_linear {mode} {n}x4096->4096 r=12 dropout=0.0 bfloat16"] = {
                p: {"median_ms": 1.0 + i * 0.1 * n / 1024} for i, p in enumerate(providers)
            }
    for model in ("llama_160m", "llama_1b"):
        for dropout, providers in (("0.0", ("peft_lora", "peft_adalora", "adalora_fast", "adalora_fast_graph")),
                                   ("0.1", ("peft_lora", "adalora_fast", "peft_adalora"))):  # fmt: skip
            groups[f"training step {model} 8x512 tokens dropout={dropout} bfloat16"] = {
                p: {"median_ms": 100.0 + 10 * i} for i, p in enumerate(providers)
            }
    groups["orth_penalty fwd+bwd 154 modules r=12 bfloat16"] = {"peft_loop": {"median_ms": 9.0},
                                                                 "adalora_fast": {"median_ms": 1.0}}  # fmt: skip
    groups["rank_allocation minilm"] = {"peft_lora": {"median_ms": 1.0},
                                        "adalora_fast": {"median_ms": 1.1, "ranks": {"l.0.q": 2, "l.1.q": 3}}}  # fmt: skip
    return groups


def test_plots_draw_each_provider_in_one_colour_with_legend_units_and_device(tmp_path, monkeypatch):
    """One colour per provider in every figure and panel (PEFT's SVDLinear was orange in one panel of
    layer_by_tokens.png and green in the next), a legend naming every provider drawn, axis labels with units,
    and the device in every title."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    report = _report_module()
    figures, save = {}, report._save

    def keep(plt, fig, out_dir, name, **kw):  # inspect each figure before _save closes it
        figures[name] = fig
        return save(plt, fig, out_dir, name, **kw)

    monkeypatch.setattr(report, "_save", keep)
    written = report.plot(_groups_for_every_plot(), str(tmp_path), device="NVIDIA H200")
    assert {os.path.basename(p) for p in written} == set(figures) >= {
        "layer_by_tokens.png", "training_step_by_model.png", "svd_linear.png", "training.png", "orth_penalty.png",
        "rank_allocation.png", "rank_heatmap.png"}  # fmt: skip

    colour_of = {}
    for name, fig in figures.items():
        drawn = _drawn_providers(fig)
        assert bool(drawn) != name.startswith("rank_heatmap"), name
        for ax, provider, colour in drawn:
            assert colour_of.setdefault(provider, colour) == colour, f"{provider} changes colour in {name}"
        for ax in fig.axes:
            in_axes = {(p, c) for a, p, c in drawn if a is ax}
            assert len({c for _, c in in_axes}) == len(in_axes), f"two providers share a colour in {name}"
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        assert {p for _, p, _ in drawn} <= {t.get_text() for legend in legends for t in legend.get_texts()}, name
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                assert "rank" in ax.get_ylabel()
                continue
            assert "NVIDIA H200" in ax.get_title(), name
            assert ax.get_xlabel() and ax.get_ylabel(), name
            if not name.startswith("rank_heatmap"):
                assert "(×)" in ax.get_xlabel() + ax.get_ylabel(), name  # the ratio's unit
    assert colour_of == {p: to_hex(report.provider_color(p)) for p in colour_of}  # the fixed table
    assert colour_of["peft_svdlinear"] == colour_of["peft_adalora"] == to_hex(report.provider_color("peft_loop"))
    ours_and_theirs = ("adalora_fast", "adalora_fast_emit", "adalora_fast_graph", "peft_svdlinear", "peft_lora",
                       "frozen_linear")  # fmt: skip
    assert len({to_hex(report.provider_color(p)) for p in ours_and_theirs}) == len(ours_and_theirs)
    assert report.provider_color("another_provider") == report.provider_color("another_provider")  # stable


def test_report_records_the_device_and_versions(tmp_path):
    """The header names the GPU benchmarks/conftest.py records (not the host CPU), and the versions."""
    data = {"machine_info": {"cpu": {"brand_raw": "host cpu"}, "gpu": "NVIDIA H200",
                             "versions": {"torch": "2.11.0+cu130", "peft": "0.21.0"}},
            "benchmarks": [_bench("svd_linear fwd", "frozen_linear", 0.002)]}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    _report_module().main([str(path), "--out", str(out)])
    text = out.read_text()
    assert "— NVIDIA H200" in text and "host cpu" not in text
    assert "Versions: torch 2.11.0+cu130, peft 0.21.0" in text


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
