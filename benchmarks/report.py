"""Turn a pytest-benchmark JSON file into BENCHMARKS.md tables (and PNG plots when matplotlib is installed).

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out BENCHMARKS.md --plots benchmarks/plots --command "<the command>"

Every table row is one benchmark group, measured in one run: each provider's median and its ratio to the
group's baseline (the frozen nn.Linear, PEFT's loop, PEFT's update_and_allocate, or PEFT LoRA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict

BASELINES = ("frozen_linear", "peft_loop", "peft_update_and_allocate", "peft_lora")


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
        baseline = next((b for b in BASELINES if b in providers), None)
        for provider, row in sorted(providers.items()):
            ratio = f"{row['median_ms'] / providers[baseline]['median_ms']:.2f}×" if baseline else ""
            extra = ", ".join(f"{k}={v}" for k, v in row.items() if k != "median_ms")
            lines.append(f"| {group} | {provider} | {row['median_ms']:.3f} | {ratio} | {extra} |")
    return "\n".join(lines) + "\n"


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
            baseline = next((b for b in BASELINES if b in providers), None)
            for provider, row in sorted(providers.items()):
                if baseline:
                    labels.append(f"{group[len(family):].strip()} · {provider}")
                    values.append(row["median_ms"] / providers[baseline]["median_ms"])
        ax.barh(labels, values)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("median time / baseline (same run)")
        ax.set_title(family)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{family}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


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
