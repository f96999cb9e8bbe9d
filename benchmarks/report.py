"""Turn a pytest-benchmark JSON file into BENCHMARKS.md tables (and PNG plots when matplotlib is installed).

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out BENCHMARKS.md --plots benchmarks/plots --command "<the command>"

Every table row is one benchmark group, measured in one run: each provider's median and its ratio to the
group's baseline (the frozen nn.Linear, PEFT's loop, PEFT's update_and_allocate, or PEFT LoRA). Benchmarks
that store the final ``ranks`` of a fine-tune also get a layer × matrix table. Plots: one bar chart of ratios
per benchmark family, the training step by model size, the layer by token count, and the rank heatmap. Every
plot draws a provider in the same colour (:data:`PROVIDER_COLORS`), has a legend, and names the device
(benchmarks/conftest.py records it, with the versions, in the JSON's ``machine_info``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import textwrap
import zlib
from collections import defaultdict

from bench_common import BASELINES, ratios_to_baseline


def load_groups(path: str) -> tuple[dict, dict]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = (bench.get("params") or {}).get("provider")
        if provider is not None:
            groups[bench["group"]][provider] = {"median_ms": bench["stats"]["median"] * 1e3, **bench.get("extra_info", {})}
    return dict(groups), data.get("machine_info", {})


# One colour per provider in every plot and panel. Stock PEFT AdaLoRA is orange in whatever part of it a
# benchmark times (the layer, the penalty loop, update_and_allocate, the whole step); those never share a chart.
PROVIDER_COLORS = {
    "adalora_fast": "tab:blue",
    "adalora_fast_graph": "tab:cyan",
    "adalora_fast_emit": "tab:purple",
    "peft_adalora": "tab:orange",
    "peft_svdlinear": "tab:orange",
    "peft_loop": "tab:orange",
    "peft_update_and_allocate": "tab:orange",
    "peft_lora": "tab:green",
    "peft_lora_graph": "tab:olive",
    "frozen_linear": "tab:gray",
}
_SPARE_COLORS = ("tab:red", "tab:brown", "tab:pink", "#393b79", "#8c6d31", "#843c39")


def provider_color(provider: str) -> str:
    """The provider's colour: fixed for the known ones, a stable pick (by a hash of the name) for others."""
    return PROVIDER_COLORS.get(provider) or _SPARE_COLORS[zlib.crc32(provider.encode()) % len(_SPARE_COLORS)]


def device_name(machine: dict) -> str:
    """The device the benchmarks ran on: the GPU benchmarks/conftest.py recorded, else the CPU's name."""
    return machine.get("gpu") or machine.get("cpu", {}).get("brand_raw") or "unknown device"


def markdown(groups: dict, machine: dict, command: str) -> str:
    device = device_name(machine)
    lines = [f"## {datetime.date.today().isoformat()} — {device}", "", f"Command: `{command}`", ""]
    versions = machine.get("versions") or {}
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    backends = machine.get("backends") or {}
    if backends:
        lines += ["Backends: " + "; ".join(f"{k}: {v}" for k, v in backends.items()), ""]
    lines += ["| group | provider | median ms | × baseline | extra |", "|---|---|---|---|---|"]
    for group, providers in sorted(groups.items()):
        ratios = _ratios(providers)
        has_baseline = any(b in providers for b in BASELINES)
        for provider, row in sorted(providers.items()):
            ratio = f"{ratios.get(provider, 1.0):.2f}×" if has_baseline else ""
            lines.append(f"| {group} | {provider} | {row['median_ms']:.3f} | {ratio} | {_extra_cell(row)} |")
    for group, (provider, ranks) in allocated_ranks(groups).items():
        layers, matrices, grid = rank_grid(ranks)
        lines += ["", f"Ranks allocated per layer ({group}, {provider}):", ""]
        lines += ["| matrix | " + " | ".join(f"layer {layer}" for layer in layers) + " |", "|---|" + "---|" * len(layers)]
        lines += [f"| {m} | " + " | ".join(str(v) for v in row) + " |" for m, row in zip(matrices, grid)]
    return "\n".join(lines) + "\n"


def _extra_cell(row: dict) -> str:
    """A row's extras as ``key=value``, empty ones left out; the calls per op and backend that
    scripts/gpu_check_plugin.py records (``calls``) as ``op backend n``."""
    parts = []
    for key, value in row.items():
        if key in ("median_ms", "ranks") or value is None or value == {}:
            continue
        if key == "calls":
            value = "; ".join(f"{op} " + " + ".join(f"{backend} {n}" for backend, n in sorted(counts.items()))
                              for op, counts in sorted(value.items()))  # fmt: skip
        parts.append(f"{key}={value}")
    return ", ".join(parts)


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


def plot(groups: dict, out_dir: str, device: str = "unknown device") -> list[str]:
    """One bar chart of ratios to the baseline per benchmark family (the group name's first word), plus the
    training step by model, the layer by token count and the rank heatmaps; ``device`` goes in every title."""
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
        bars = []  # (label, provider, ratio), top to bottom
        baselines = set()
        for group, providers in sorted(fam_groups.items()):
            baselines.add(ratios_to_baseline({p: row["median_ms"] for p, row in providers.items()})[0])
            for provider, ratio in sorted(_ratios(providers).items()):  # the baseline is the line at 1
                bars.append((group[len(family) :].strip() or group, provider, ratio))
        if not bars:
            continue
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.3 * len(bars)))
        ys = list(range(len(bars)))[::-1]
        for provider in sorted({p for _, p, _ in bars}):
            at = [(y, ratio) for y, (_, p, ratio) in zip(ys, bars) if p == provider]
            ax.barh([y for y, _ in at], [r for _, r in at], color=provider_color(provider), label=provider)
        ax.set_yticks(ys, [label for label, _, _ in bars], fontsize=8)
        baseline = " / ".join(sorted(b for b in baselines if b)) or "baseline"
        ax.axvline(1.0, color="black", linewidth=0.8, label=f"{baseline} (= 1)")
        ax.set_xlabel(f"median time ÷ {baseline}'s median, same run (×)")
        ax.set_ylabel("benchmark · provider")
        ax.set_title(f"{family} — {device}")
        ax.legend(fontsize=8, loc="best")
        written.append(_save(plt, fig, out_dir, f"{family}.png"))
    written += _plot_step_by_model(plt, groups, out_dir, device)
    written += _plot_layer_by_tokens(plt, groups, out_dir, device)
    written += _plot_rank_heatmaps(plt, groups, out_dir, device)
    return written


def _figure_legend(fig, axes) -> None:
    """One legend for the whole figure: every provider drawn in any panel, once, in its colour."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 4), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))  # fmt: skip


def _plot_step_by_model(plt, groups: dict, out_dir: str, device: str) -> list[str]:
    """Training step time / PEFT LoRA's, per model (x) and provider (bars), one panel per dropout."""
    series = defaultdict(lambda: defaultdict(dict))  # dropout → provider → model → ratio
    for group, providers in groups.items():
        found = re.match(r"training step (\S+) .*dropout=(\S+)", group)
        if found:
            for provider, ratio in _ratios(providers).items():
                series[found.group(2)][provider][found.group(1)] = ratio
    if not series:
        return []
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.6), squeeze=False)
    for ax, (dropout, by_provider) in zip(axes[0], sorted(series.items())):
        models = sorted({m for ratios in by_provider.values() for m in ratios})
        width = 0.8 / len(by_provider)
        for i, (provider, ratios) in enumerate(sorted(by_provider.items())):
            ax.bar([x + i * width for x in range(len(models))], [ratios.get(m, 0) for m in models], width,
                   color=provider_color(provider), label=provider)  # fmt: skip
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(models))], models)
        ax.axhline(1.0, color="black", linewidth=0.8, label="peft_lora (= 1)")
        ax.set_xlabel("model")
        ax.set_ylabel("step time ÷ PEFT LoRA's step time, same run (×)")
        ax.set_title(f"training step, dropout {dropout} — {device}", fontsize=10)
    _figure_legend(fig, axes[0])
    return [_save(plt, fig, out_dir, "training_step_by_model.png", legend_space=True)]


def _plot_layer_by_tokens(plt, groups: dict, out_dir: str, device: str) -> list[str]:
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
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.6 + 3 * len(panels)), squeeze=False)
    for ax, (panel, by_provider) in zip(axes[:, 0], sorted(panels.items())):
        for provider, ratios in sorted(by_provider.items()):
            tokens = sorted(ratios)
            ax.plot(tokens, [ratios[t] for t in tokens], marker="o", color=provider_color(provider), label=provider)
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="black", linewidth=0.8, label="frozen_linear (= 1)")
        ax.set_xlabel("tokens per batch (log scale)")
        ax.set_ylabel("time ÷ frozen nn.Linear's (×)")
        ax.set_title(f"{panel} — {device}", fontsize=9)
    _figure_legend(fig, axes[:, 0])
    return [_save(plt, fig, out_dir, "layer_by_tokens.png", legend_space=True)]


def _plot_rank_heatmaps(plt, groups: dict, out_dir: str, device: str) -> list[str]:
    """The final rank of every adapted matrix, layer × matrix, as in the paper's Figure 1."""
    written = []
    for i, (group, (provider, ranks)) in enumerate(allocated_ranks(groups).items()):
        layers, matrices, grid = rank_grid(ranks)
        fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.6 * len(layers)), max(3.0, 1.5 + 0.45 * len(matrices))))
        image = ax.imshow(grid, cmap="YlGn", aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(matrices)), matrices)
        ax.set_xlabel("layer (index)")
        ax.set_ylabel("adapted matrix")
        ax.set_title(f"final ranks ({provider}) — {device}\n" + textwrap.fill(group, 40), fontsize=8)
        fig.colorbar(image, ax=ax, label="rank (kept singular triplets)")
        written.append(_save(plt, fig, out_dir, "rank_heatmap.png" if i == 0 else f"rank_heatmap_{i}.png"))
    return written


def _save(plt, fig, out_dir: str, name: str, legend_space: bool = False) -> str:
    """Lay out and write one figure (``legend_space``: leave the top for a figure legend), then close it."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if legend_space else None)
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
        for path in plot(groups, args.plots, device_name(machine)):
            print(f"wrote {path}")
    print(f"appended {sum(len(p) for p in groups.values())} rows to {args.out}")


if __name__ == "__main__":
    main()
