"""Turn a pytest-benchmark JSON file into BENCHMARKS.md tables (and PNG plots when matplotlib is installed).

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out BENCHMARKS.md --plots benchmarks/plots --command "<the command>"

Every table row is one benchmark group, measured in one run: each provider's median and its ratio to the
group's baseline (the frozen nn.Linear, PEFT's loop, PEFT's update_and_allocate, or PEFT LoRA). Benchmarks
that store the final ``ranks`` of a fine-tune also get a layer × matrix table. Plots: one bar chart of ratios
per benchmark family, the training step by model size, the layer by token count, and the rank heatmap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import textwrap
from collections import defaultdict

from adalora_fast.benchmarking import BASELINES, ratios_to_baseline


def load_groups(path: str) -> tuple[dict, dict]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = (bench.get("params") or {}).get("provider")
        if provider is not None:
            groups[bench["group"]][provider] = {"median_ms": bench["stats"]["median"] * 1e3, **bench.get("extra_info", {})}
    return dict(groups), data.get("machine_info", {})


def markdown(groups: dict, machine: dict, command: str) -> str:
    device = machine.get("gpu", machine.get("cpu", {}).get("brand_raw", "unknown device"))
    lines = [f"## {datetime.date.today().isoformat()} — {device}", "", f"Command: `{command}`", ""]
    lines += ["| group | provider | median ms | × baseline | extra |", "|---|---|---|---|---|"]
    for group, providers in sorted(groups.items()):
        ratios = _ratios(providers)
        has_baseline = any(b in providers for b in BASELINES)
        for provider, row in sorted(providers.items()):
            ratio = f"{ratios.get(provider, 1.0):.2f}×" if has_baseline else ""
            extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("median_ms", "ranks"))
            lines.append(f"| {group} | {provider} | {row['median_ms']:.3f} | {ratio} | {extra} |")
    for group, (provider, ranks) in allocated_ranks(groups).items():
        layers, matrices, grid = rank_grid(ranks)
        lines += ["", f"Ranks allocated per layer ({group}, {provider}):", ""]
        lines += ["| matrix | " + " | ".join(f"layer {layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
        lines += [f"| {m} | " + " | ".join(str(v) for v in row) + " |" for m, row in zip(matrices, grid)]
    return "\n".join(lines) + "\n"


def allocated_ranks(groups: dict) -> dict[str, tuple[str, dict]]:
    """group → (provider, {module: rank}) for groups whose benchmarks stored ``ranks`` (adalora_fast first)."""
    found = {}
    for group, providers in sorted(groups.items()):
        with_ranks = [p for p in sorted(providers) if "ranks" in providers[p]]
        if with_ranks:
            provider = "adalora_fast" if "adalora_fast" in with_ranks else with_ranks[0]
            found[group] = (provider, providers[provider]["ranks"])
    return found


def rank_grid(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[int]]]:
    """(layers, matrices, ranks[matrix][layer]) from module names: the first all-digit component is the
    layer, what follows it names the matrix (``attention.self.query``, ``mlp.up_proj``)."""
    cells, layers, matrices = {}, set(), []
    for name, rank in ranks.items():
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        layer, matrix = (int(parts[at]), ".".join(parts[at + 1 :])) if at is not None else (0, name)
        cells[matrix, layer] = rank
        layers.add(layer)
        if matrix not in matrices:
            matrices.append(matrix)
    layers = sorted(layers)
    return layers, matrices, [[cells.get((m, layer), 0) for layer in layers] for m in matrices]


def _ratios(providers: dict) -> dict[str, float]:
    """Every provider's ratio to the group's baseline, the baseline itself left out."""
    baseline, ratios = ratios_to_baseline({p: row["median_ms"] for p, row in providers.items()})
    return {p: ratio for p, ratio in ratios.items() if p != baseline}


def plot(groups: dict, out_dir: str) -> list[str]:
    """One bar chart of ratios to the baseline per benchmark family (the group name's first word)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    families: dict[str, dict] = defaultdict(dict)
    for group, providers in groups.items():
        families[group.split()[0]][group] = providers
    written = []
    for family, fam_groups in families.items():
        fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(fam_groups) * 3))
        labels, values = [], []
        for group, providers in sorted(fam_groups.items()):
            for provider, ratio in sorted(_ratios(providers).items()):  # the baseline is the line at 1
                labels.append(f"{group[len(family):].strip()} · {provider}")
                values.append(ratio)
        ax.barh(labels, values)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("median time / baseline (same run)")
        ax.set_title(family)
        written.append(_save(plt, fig, out_dir, f"{family}.png"))
    written += _plot_step_by_model(plt, groups, out_dir)
    written += _plot_layer_by_tokens(plt, groups, out_dir)
    written += _plot_rank_heatmaps(plt, groups, out_dir)
    return written


def _plot_step_by_model(plt, groups: dict, out_dir: str) -> list[str]:
    """Training step time / PEFT LoRA's, per model (x) and provider (bars), one panel per dropout."""
    series = defaultdict(lambda: defaultdict(dict))  # dropout → provider → model → ratio
    for group, providers in groups.items():
        found = re.match(r"training step (\S+) .*dropout=(\S+)", group)
        if found:
            for provider, ratio in _ratios(providers).items():
                series[found.group(2)][provider][found.group(1)] = ratio
    if not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (dropout, by_provider) in zip(axes[0], sorted(series.items())):
        models = sorted({m for ratios in by_provider.values() for m in ratios})
        width = 0.8 / len(by_provider)
        for i, (provider, ratios) in enumerate(sorted(by_provider.items())):
            ax.bar([x + i * width for x in range(len(models))], [ratios.get(m, 0) for m in models], width, label=provider)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("step time / PEFT LoRA step (same run)")
        ax.set_title(f"training step, dropout {dropout}")
        ax.legend()
    return [_save(plt, fig, out_dir, "training_step_by_model.png")]


def _plot_layer_by_tokens(plt, groups: dict, out_dir: str) -> list[str]:
    """Layer time / frozen nn.Linear's against the token count, one panel per (mode, shape, dropout)."""
    panels = defaultdict(lambda: defaultdict(dict))  # panel → provider → tokens → ratio
    for group, providers in groups.items():
        found = re.match(r"svd_linear (\S+) (\d+)x(\S+) (.*)", group)
        if found:
            panel = f"{found.group(1)} {found.group(3)} {found.group(4)}"
            for provider, ratio in _ratios(providers).items():
                panels[panel][provider][int(found.group(2))] = ratio
    # a shape measured at one token count is no sweep
    panels = {k: v for k, v in panels.items() if max(len(ratios) for ratios in v.values()) > 1}
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), squeeze=False)
    for ax, (panel, by_provider) in zip(axes[:, 0], sorted(panels.items())):
        for provider, ratios in sorted(by_provider.items()):
            tokens = sorted(ratios)
            ax.plot(tokens, [ratios[t] for t in tokens], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / frozen nn.Linear")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=8)
    return [_save(plt, fig, out_dir, "layer_by_tokens.png")]


def _plot_rank_heatmaps(plt, groups: dict, out_dir: str) -> list[str]:
    """The final rank of every adapted matrix, layer × matrix, as in the paper's Figure 1."""
    written = []
    for i, (group, (provider, ranks)) in enumerate(allocated_ranks(groups).items()):
        layers, matrices, grid = rank_grid(ranks)
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(layers), 1 + 0.45 * len(matrices)))
        image = ax.imshow(grid, cmap="YlGn", aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(matrices)), matrices)
        ax.set_xlabel("layer")
        ax.set_title(f"final ranks ({provider})\n" + textwrap.fill(group, 40), fontsize=8)
        fig.colorbar(image, ax=ax)
        written.append(_save(plt, fig, out_dir, "rank_heatmap.png" if i == 0 else f"rank_heatmap_{i}.png"))
    return written


def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_file")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append the tables to")
    parser.add_argument("--plots", default=None, help="folder for PNG plots")
    parser.add_argument("--command", default="pytest benchmarks/ --benchmark-only", help="the command that measured")
    args = parser.parse_args(argv)
    groups, machine = load_groups(args.json_file)
    with open(args.out, "a") as f:
        f.write(markdown(groups, machine, args.command))
    if args.plots:
        for path in plot(groups, args.plots):
            print(f"wrote {path}")
    print(f"appended {sum(len(p) for p in groups.values())} rows to {args.out}")


if __name__ == "__main__":
    main()
