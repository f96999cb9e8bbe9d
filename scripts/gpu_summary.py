"""The Python side of scripts/gpu_check.sh: its requirements, SUMMARY.md, and merged benchmark JSON.

    python scripts/gpu_summary.py requirements --logs DIR      # what the check needs: DIR/requirements.tsv
    python scripts/gpu_summary.py --logs DIR --out SUMMARY.md       # what DIR holds so far (any stage may be missing)
    python scripts/gpu_summary.py merge A.json B.json --out C.json  # pytest-benchmark JSON files into one

The summary reads from the logs folder: ``stages.tsv`` (stage, status, seconds, note), ``requirements.tsv``,
``extension.txt`` (whether adalora_fast._C loads after the build), ``build.log``, ``env.json``
(env_report plus versions), ``tests*.jsonl`` and ``bench*.jsonl`` (scripts/gpu_check_plugin.py's records of
the test and the benchmark stages) and ``profile.md`` (benchmarks/profile_step.py). It imports neither torch
nor the package: it runs even when those are broken, and in well under a second. ``requirements`` imports
every requirement: that is its check.

SUMMARY.md's first screen (:data:`FIRST_SCREEN` lines) answers, in this order: what is missing or did not
build, the stages, whether the adapter ran the kernels in the tests and in each benchmark provider, the layer
table, the training step table, and the failed tests by name; the rest of the file has the details.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from typing import NamedTuple

FIRST_SCREEN = 40
STEP_PROVIDERS = ("peft_lora", "peft_adalora", "adalora_fast", "peft_lora_graph", "adalora_fast_graph")
LAYER_PROVIDERS = ("peft_lora", "peft_svdlinear", "adalora_fast")  # beside frozen_linear, the baseline


# ---------------------------------------------------------------------------------------------------
# Requirements


class Requirement(NamedTuple):
    name: str  # as the check names it (and gpu_check.sh's stages name what they need)
    module: str  # imported to check it
    distribution: str
    minimum: int | None = None  # the lowest major version that works


TORCH_WITH_CUDA = "torch with CUDA"
REQUIREMENTS = (
    Requirement("torch", "torch", "torch"),
    Requirement("triton", "triton", "triton"),
    Requirement("pytest", "pytest", "pytest"),
    Requirement("setuptools>=64", "setuptools", "setuptools", 64),  # an editable install (PEP 660)
    Requirement("pytest-xdist", "xdist", "pytest-xdist"),
    Requirement("hypothesis", "hypothesis", "hypothesis"),
    Requirement("pytest-benchmark", "pytest_benchmark", "pytest-benchmark"),
    Requirement("peft", "peft", "peft"),
    Requirement("transformers", "transformers", "transformers"),
)
# Without one of these nothing the check runs says anything (the project cannot be installed, no kernel can
# run on the GPU, or no test can run): it stops at once. Without any other it goes on and skips what needs it.
ESSENTIAL = ("torch", TORCH_WITH_CUDA, "triton", "pytest", "setuptools>=64")


def _major(version: str) -> int:
    found = re.match(r"\d+", version)
    return int(found.group()) if found else 0


def _gpu_visible() -> bool:
    """Whether the machine has an NVIDIA GPU, whatever torch makes of it."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def check_requirements() -> tuple[dict[str, str], dict[str, str], bool]:
    """({name: version} found, {name: why} missing, whether torch sees a GPU)."""
    found, missing = {}, {}
    for req in REQUIREMENTS:
        try:
            importlib.import_module(req.module)
            version = md.version(req.distribution)
        except ModuleNotFoundError as exc:
            missing[req.name] = "not installed" if exc.name == req.module else f"import failed: {exc}"
            continue
        except md.PackageNotFoundError:
            missing[req.name] = "no installed distribution"
            continue
        except Exception as exc:  # noqa: BLE001 - a broken install is missing too; say how it broke
            missing[req.name] = f"import failed: {type(exc).__name__}: {str(exc)[:100]}"
            continue
        if req.minimum is not None and _major(version) < req.minimum:
            missing[req.name] = f"version {version}"
        else:
            found[req.name] = version
    cuda = False
    if "torch" in found:
        import torch

        cuda = torch.cuda.is_available()
        if not cuda and _gpu_visible():
            missing[TORCH_WITH_CUDA] = f"torch {torch.__version__} sees no GPU; nvidia-smi lists one"
    return found, missing, cuda


def write_requirements(logs: str) -> int:
    """requirements.tsv (``found``/``missing`` NAME DETAIL, ``cuda`` 0|1, ``stop`` 0|1) and one line on stdout;
    exit status 3 when the check must stop."""
    found, missing, cuda = check_requirements()
    stop = any(name in missing for name in ESSENTIAL)
    with open(os.path.join(logs, "requirements.tsv"), "w") as f:
        f.writelines(f"found\t{name}\t{version}\n" for name, version in found.items())
        f.writelines(f"missing\t{name}\t{why}\n" for name, why in missing.items())
        f.write(f"cuda\t{int(cuda)}\nstop\t{int(stop)}\n")
    if missing:
        print("missing: " + ", ".join(f"{name} ({why})" for name, why in missing.items()) + (" — stopping" if stop else ""))
    else:
        print("requirements: " + ", ".join(f"{name} {version}" for name, version in found.items()))
    return 3 if stop else 0


def _read_requirements(logs: str) -> tuple[dict[str, str], bool]:
    """({name: why} missing, stop?) from requirements.tsv ({} and False when the check did not run)."""
    missing, stop = {}, False
    path = os.path.join(logs, "requirements.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if parts[0] == "missing" and len(parts) == 3:
                    missing[parts[1]] = parts[2]
                elif parts[0] == "stop":
                    stop = parts[1:] == ["1"]
    return missing, stop


# ---------------------------------------------------------------------------------------------------
# Reading the logs


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


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _stages(logs):
    rows = []
    for line in _read_text(os.path.join(logs, "stages.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    return rows


def _final_outcomes(records) -> dict[str, dict]:
    """nodeid → the record that decides the test (a setup error, then nothing; a call, then a teardown error)."""
    final = {}
    for r in records:
        if r.get("kind") != "test":
            continue
        prev = final.get(r["nodeid"])
        if prev is None or r["outcome"] in ("failed", "error") or prev["outcome"] == "passed" and r["when"] != "call":
            final[r["nodeid"]] = r
    return final


def _build_error(logs: str) -> str:
    """The build log's last line that names an error (or its last line), the extension's status left out."""
    lines = [line.strip() for line in _read_text(os.path.join(logs, "build.log")).splitlines()
             if line.strip() and not line.startswith("adalora_fast._C:")]  # fmt: skip
    errors = [line for line in lines if re.search(r"error", line, re.I)]
    return (errors or lines or ["no build log"])[-1][:200]


# ---------------------------------------------------------------------------------------------------
# Sections


def _count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{_count(n)} {word if n == 1 else plural or word + 's'}"


def _calls_text(calls: dict | None, ops=("svd_adapter", "orth_penalty")) -> str:
    """``adapter triton 1 540; penalty extension 11`` from a plugin ``calls`` record."""
    names = {"svd_adapter": "adapter", "orth_penalty": "penalty"}
    parts = []
    for op in ops:
        counts = (calls or {}).get(op) or {}
        if counts:
            parts.append(names[op] + " " + " + ".join(f"{b} {_count(n)}" for b, n in sorted(counts.items())))
    return "; ".join(parts) or "—"


def _alerts(logs: str, stages) -> list[str]:
    """What stopped the check or did not build, first of all."""
    lines = []
    missing, stop = _read_requirements(logs)
    if missing:
        what = ", ".join(f"{name} ({why})" for name, why in missing.items())
        then = (" The check stopped: without torch (with CUDA on a GPU), triton, pytest and setuptools ≥ 64 nothing "
                "it runs would say anything." if stop else " The stages that need what is missing were skipped (below).")  # fmt: skip
        lines.append(f"**Missing: {what}.**{then}")
    build = next((status for name, status, _, _ in stages if name == "build"), None)
    if build is not None and build != "ok":
        extension = _read_text(os.path.join(logs, "extension.txt")).strip() or "unknown"
        line = f"**The extension did not build** ({build}: `{_build_error(logs)}`, build.log). adalora_fast._C: {extension}."
        if extension.startswith("not loaded"):
            line += (" The library runs without it (its ops fall back to the PyTorch reference, with a warning): "
                     "the tests that need it fail by name below; the kernels' tests and the benchmarks still ran.")  # fmt: skip
        else:
            line += " (An earlier build: the tests and benchmarks ran that one.)"
        lines.append(line)
    return lines


def _kernels_ran(test_records, bench_records, on_gpu: bool) -> list[str]:
    """Whether the adapter ran the kernels: calls per backend over the test stages and per benchmark provider
    (``on_gpu``: a fast provider's reference calls are a fallback, in bold)."""
    lines = []
    per_backend, tests_per_backend, penalty, launches = defaultdict(int), defaultdict(int), defaultdict(int), 0
    for r in _final_outcomes(test_records).values():
        calls = r.get("calls") or {}
        for backend, n in (calls.get("svd_adapter") or {}).items():
            per_backend[backend] += n
            tests_per_backend[backend] += 1
        for backend, n in (calls.get("orth_penalty") or {}).items():
            penalty[backend] += n
        launches += sum((calls.get("kernel_launches") or {}).values())
    if test_records:
        adapter = ", ".join(f"{b} {_plural(n, 'call')} in {_plural(tests_per_backend[b], 'test')}"
                            for b, n in sorted(per_backend.items()))  # fmt: skip
        text = f"Kernels ran — tests: adapter {adapter or 'never called'}"
        if penalty:
            text += "; penalty " + ", ".join(f"{b} {_count(n)}" for b, n in sorted(penalty.items()))
        lines.append(text + f"; {_plural(launches, 'Triton launch', 'Triton launches')}.")
    per_provider = defaultdict(lambda: defaultdict(int))
    for r in bench_records:
        if r.get("kind") != "bench":
            continue
        provider = (r.get("params") or {}).get("provider")
        for backend, n in ((r.get("calls") or {}).get("svd_adapter") or {}).items():
            per_provider[provider or r["nodeid"].split("::")[-1]][backend] += n
    if per_provider:
        cells = []
        for provider, counts in sorted(per_provider.items()):
            text = f"{provider} " + " + ".join(f"{b} {_count(n)}" for b, n in sorted(counts.items()))
            cells.append(f"**{text}**" if on_gpu and counts.get("reference") else text)  # a fallback stands out
        lines.append("Kernels ran — benchmarks (adapter calls; PEFT's providers never reach it): " + " · ".join(cells) + ".")
    return lines + [""] if lines else []


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
             "| tokens×in→out, dropout | frozen fwd ms | fwd: LoRA / stock / **fast** | fwd+bwd: LoRA / stock / **fast** "
             "| fast ran on |", "|---|---|---|---|---|"]  # fmt: skip
    for (tokens, fin, fout, dropout), modes in sorted(rows.items()):
        cells, frozen_fwd, fast_calls = [], "—", defaultdict(int)
        for mode in ("forward", "forward_backward"):
            p = modes.get(mode, {})
            base = p.get("frozen_linear")
            if base is None:
                cells.append("—")
                continue
            if mode == "forward":
                frozen_fwd = f"{base['median_s'] * 1e3:.3f}"
            ratios = [f"{p[k]['median_s'] / base['median_s']:.2f}" if k in p else "—" for k in LAYER_PROVIDERS]
            cells.append(" / ".join(ratios[:-1]) + f" / **{ratios[-1]}**")
            for backend, n in ((p.get("adalora_fast", {}).get("calls") or {}).get("svd_adapter") or {}).items():
                fast_calls[backend] += n
        ran = " + ".join(f"{b} {_count(n)}" for b, n in sorted(fast_calls.items())) or "—"
        lines.append(f"| {tokens}×{fin}→{fout}, {dropout} | {frozen_fwd} | {cells[0]} | {cells[1]} | {ran} |")
    return lines + [""]


def _step_section(groups):
    lines = []
    for group, providers in sorted(groups.items()):
        if not group.startswith("training step") or "peft_lora" not in providers:
            continue
        base = providers["peft_lora"]["median_s"]
        lines += [f"## Training step ÷ PEFT LoRA eager (same run): {group[len('training step '):]}", "",
                  "| provider | ms | × PEFT LoRA | peak GiB | ran on |", "|---|---|---|---|---|"]  # fmt: skip
        order = [p for p in STEP_PROVIDERS if p in providers] + sorted(set(providers) - set(STEP_PROVIDERS))
        for p in order:
            r = providers[p]
            peak = (r.get("extra_info") or {}).get("peak_memory_gib", "—")
            ran = _calls_text(r.get("calls")) if p.startswith("adalora_fast") else "PEFT"
            lines.append(f"| {p} | {r['median_s'] * 1e3:.1f} | {r['median_s'] / base:.2f}× | {peak} | {ran} |")
        lines.append("")
    return lines


def _bandwidth_section(records) -> list[str]:
    """The adapter kernels alone (benchmarks/test_bench_adapter_kernels.py): GB/s and the fraction of peak."""
    rows = []
    for r in records:
        extra = r.get("extra_info") or {}
        if r.get("kind") == "bench" and extra.get("gbps") is not None:
            share = extra.get("fraction_of_peak")
            of_peak = f", {share:.0%} of {extra['peak_gbps']:.0f}" if share is not None else " (peak unknown)"
            rows.append(f"- {r.get('group')}: {extra['gbps']:.0f} GB/s{of_peak}")
    return ["## Adapter kernels alone: HBM bandwidth", ""] + sorted(rows) + [""] if rows else []


def _failed_lines(final: dict, limit: int) -> list[str]:
    """The failed tests by name, at most ``limit`` of them (at least 3)."""
    bad = sorted((r for r in final.values() if r["outcome"] in ("failed", "error")), key=lambda r: r["nodeid"])
    if not bad:
        return []
    lines = [f"## Failed tests ({len(bad)} of {len(final)})", ""]
    shown = bad if len(bad) <= max(limit, 3) else bad[: max(limit - 1, 3)]
    for r in shown:
        message = r.get("message", "")
        crash = " **(crashed)**" if "crashed" in message or "signal" in message else ""
        lines.append(f"- `{r['nodeid']}`{crash}{' (' + r['outcome'] + ')' if r['outcome'] == 'error' else ''}: {message[:150]}")
    if len(shown) < len(bad):
        lines.append(f"- … and {len(bad) - len(shown)} more: " + ", ".join(f"`{r['nodeid']}`" for r in bad[len(shown) :]))
    return lines + [""]


def _counts_section(final: dict) -> list[str]:
    counts = defaultdict(int)
    for r in final.values():
        counts[r["outcome"]] += 1
    lines = ["## Tests and benchmarks", ""]
    if not final:
        return lines + ["No test results were recorded.", ""]
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".")
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


def _profile_section(logs):
    text = _read_text(os.path.join(logs, "profile.md"))
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
    try:
        env = json.loads(_read_text(os.path.join(logs, "env.json")) or "{}")
    except json.JSONDecodeError:
        env = {}
    stages = _stages(logs)
    lines = [f"# GPU check: {env.get('device', 'device unknown')}, {env.get('date', '')}".rstrip(", "), ""]
    lines += _alerts(logs, stages)
    if env:
        lines.append(", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "peft", "transformers", "commit") if k in env) + ".")
        lines.append(f"Backends here: svd_adapter = {env.get('svd_adapter', '?')}; orth_penalty = {env.get('orth_penalty', '?')}.")
    if stages:
        lines.append("Stages: " + " · ".join(f"{name} {status} ({secs} s){' — ' + note if note else ''}"
                                            for name, status, secs, note in stages))  # fmt: skip
    lines.append("")
    test_records = _read_jsonl(sorted(glob.glob(os.path.join(logs, "tests*.jsonl"))))
    bench_records = _read_jsonl(sorted(glob.glob(os.path.join(logs, "bench*.jsonl"))))
    lines += _kernels_ran(test_records, bench_records, bool(env.get("cuda_available")))
    groups = _bench_groups(bench_records)
    lines += _layer_section(groups)
    lines += _step_section(groups)
    final = _final_outcomes(test_records + bench_records)
    lines += _failed_lines(final, FIRST_SCREEN - len(lines) - 3)  # what fits on the first screen
    lines += _bandwidth_section(bench_records)
    lines += _counts_section(final)
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
    parser.add_argument("inputs", nargs="*", help="'requirements', or 'merge' then pytest-benchmark JSON files")
    parser.add_argument("--logs")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.inputs[:1] == ["requirements"]:
        return write_requirements(args.logs)
    if args.out is None:
        parser.error("--out is required")
    if args.inputs[:1] == ["merge"]:
        return merge(args.inputs[1:], args.out)
    text = summary(args.logs)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
