"""SUMMARY.md of scripts/gpu_check.sh: one screen with the stages, the tests, the ratio tables, the backends.

    python scripts/gpu_summary.py --logs DIR --out SUMMARY.md     # what DIR holds so far (any stage may be missing)
    python scripts/gpu_summary.py merge A.json B.json --out C.json  # pytest-benchmark JSON files into one

Reads from the logs folder: ``stages.tsv`` (stage, status, seconds, note), ``env.json`` (env_report plus
versions), ``tests*.jsonl`` and ``bench*.jsonl`` (scripts/gpu_check_plugin.py records of the test and the
benchmark stages) and
``profile.md`` (benchmarks/profile_step.py). Imports neither torch nor the package: it runs even when those
are broken, and in well under a second.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

MAX_FAILED_LISTED = 20
STEP_PROVIDERS = ("peft_lora", "peft_adalora", "adalora_fast", "peft_lora_graph", "adalora_fast_graph")


def _read_jsonl(paths):
    records = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
    return records


def _stages(logs):
    path = os.path.join(logs, "stages.tsv")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    rows.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    return rows


def _tests_section(records):
    tests = [r for r in records if r.get("kind") == "test"]
    final = {}
    for r in tests:  # the last word on a test wins (a setup error, then nothing; a call, then a teardown error)
        prev = final.get(r["nodeid"])
        if prev is None or r["outcome"] in ("failed", "error") or prev["outcome"] == "passed" and r["when"] != "call":
            final[r["nodeid"]] = r
    counts = defaultdict(int)
    for r in final.values():
        counts[r["outcome"]] += 1
    lines = ["## Tests", ""]
    if not final:
        return lines + ["No test results were recorded.", ""]
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".")
    bad = sorted((r for r in final.values() if r["outcome"] in ("failed", "error")), key=lambda r: r["nodeid"])
    if bad:
        lines += ["", "Failed:"]
        for r in bad[:MAX_FAILED_LISTED]:
            crash = " **(crashed)**" if "crashed" in r.get("message", "") or "signal" in r.get("message", "") else ""
            lines.append(f"- `{r['nodeid']}`{crash}: {r.get('message', '')[:160]}")
        if len(bad) > MAX_FAILED_LISTED:
            lines.append(f"- … and {len(bad) - MAX_FAILED_LISTED} more (logs: tests.log)")
    passed = sorted(r["nodeid"] for r in final.values() if r["outcome"] == "passed")
    if passed:
        lines += ["", f"Passed ({len(passed)}): " + _compact(passed)]
    return lines + [""]


def _compact(nodeids, width=600):
    """Passed tests, grouped by file (`file: n`), to fit a few lines."""
    per_file = defaultdict(int)
    for n in nodeids:
        per_file[n.split("::")[0]] += 1
    text = ", ".join(f"{os.path.basename(f)} {k}" for f, k in sorted(per_file.items()))
    return text if len(text) <= width else text[:width] + " …"


def _backends(extra):
    b = (extra or {}).get("backends") or {}
    parts = []
    for op in ("adapter", "penalty"):
        if b.get(op):
            parts.append(f"{op} " + "+".join(sorted(b[op])))
    return "; ".join(parts) or "—"


def _bench_groups(records):
    groups = defaultdict(dict)
    for r in records:
        if r.get("kind") == "bench" and r.get("median_s") is not None:
            provider = (r.get("params") or {}).get("provider")
            if provider:
                groups[r.get("group") or "?"][provider] = r
    return groups


def _layer_section(groups):
    rows = {}
    pattern = re.compile(r"svd_linear (forward_backward|forward) (\d+)x(\d+)->(\d+) r=\d+ dropout=([\d.]+)")
    for group, providers in groups.items():
        m = pattern.match(group)
        if m:
            mode, tokens, fin, fout, dropout = m.groups()
            rows.setdefault((int(tokens), int(fin), int(fout), float(dropout)), {})[mode] = providers
    if not rows:
        return []
    lines = ["## Layer: time ÷ frozen nn.Linear (same run)", "",
             "| tokens×in→out, dropout | frozen fwd ms | fwd: stock / **fast** | fwd+bwd: stock / **fast** | fast ran on |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (tokens, fin, fout, dropout), modes in sorted(rows.items()):
        cells, frozen_fwd, backend = [], "—", "—"
        for mode in ("forward", "forward_backward"):
            p = modes.get(mode, {})
            base = p.get("frozen_linear")
            if base is None:
                cells.append("—")
                continue
            if mode == "forward":
                frozen_fwd = f"{base['median_s'] * 1e3:.3f}"
            ratio = {k: v["median_s"] / base["median_s"] for k, v in p.items()}
            cells.append(f"{ratio.get('peft_svdlinear', float('nan')):.2f} / **{ratio.get('adalora_fast', float('nan')):.2f}**")
            if "adalora_fast" in p:
                backend = _backends(p["adalora_fast"].get("extra_info"))
        lines.append(f"| {tokens}×{fin}→{fout}, {dropout} | {frozen_fwd} | {cells[0]} | {cells[1]} | {backend} |")
    return lines + [""]


def _step_section(groups):
    lines = []
    for group, providers in sorted(groups.items()):
        if not group.startswith("training step") or "peft_lora" not in providers:
            continue
        base = providers["peft_lora"]["median_s"]
        if not lines:
            lines = ["## Training step: time ÷ PEFT LoRA eager (same run)", ""]
        lines += [f"{group}:", "", "| provider | ms | × PEFT LoRA | peak GiB | ran on |", "|---|---|---|---|---|"]
        order = [p for p in STEP_PROVIDERS if p in providers] + sorted(set(providers) - set(STEP_PROVIDERS))
        for p in order:
            r = providers[p]
            peak = (r.get("extra_info") or {}).get("peak_memory_gib", "—")
            lines.append(f"| {p} | {r['median_s'] * 1e3:.1f} | {r['median_s'] / base:.2f}× | {peak} | {_backends(r.get('extra_info'))} |")
        lines.append("")
    return lines


def _profile_section(logs):
    path = os.path.join(logs, "profile.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = []
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        title = block.splitlines()[0]
        rows = [line for line in block.splitlines() if re.match(r"\| \w+ \| [\d.]+ \| [\d.]+ \| \d+ \|", line)]
        if rows:
            lines += [f"## {title}", "", "| provider | wall ms / step | device ms / step | kernels / step |", "|---|---|---|---|"]
            lines += rows + [""]
    return lines


def summary(logs: str) -> str:
    env = {}
    if os.path.exists(os.path.join(logs, "env.json")):
        try:
            with open(os.path.join(logs, "env.json")) as f:
                env = json.load(f)
        except (OSError, json.JSONDecodeError):
            env = {}
    lines = [f"# GPU check: {env.get('device', 'device unknown')}, {env.get('date', '')}".rstrip(", "), ""]
    if env:
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "peft", "transformers", "commit") if k in env)
        lines += [versions + ".", f"Backends here: svd_adapter = {env.get('svd_adapter', '?')}; "
                  f"orth_penalty = {env.get('orth_penalty', '?')}.", ""]  # fmt: skip
    stages = _stages(logs)
    if stages:
        lines += ["Stages: " + " · ".join(f"{name} {status} ({secs} s){' — ' + note if note else ''}"
                                          for name, status, secs, note in stages), ""]  # fmt: skip
    lines += _tests_section(_read_jsonl(sorted(glob.glob(os.path.join(logs, "tests*.jsonl")))))
    records = _read_jsonl(sorted(glob.glob(os.path.join(logs, "bench*.jsonl"))))
    broken = sorted({r["nodeid"] for r in records if r.get("kind") == "test" and r["outcome"] in ("failed", "error")})
    if broken:
        lines += [f"Benchmarks that failed ({len(broken)}): " + ", ".join(f"`{n.split('::')[-1]}`" for n in broken[:12])
                  + (" …" if len(broken) > 12 else ""), ""]  # fmt: skip
    groups = _bench_groups(records)
    lines += _layer_section(groups)
    lines += _step_section(groups)
    lines += _profile_section(logs)
    lines += ["Logs, junit XML, benchmark JSON and profile: the tarball beside this file."]
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: str) -> int:
    merged = None
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    if merged is None:
        return 1
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="'merge' then pytest-benchmark JSON files")
    parser.add_argument("--logs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.inputs[:1] == ["merge"]:
        return merge(args.inputs[1:], args.out)
    text = summary(args.logs)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
