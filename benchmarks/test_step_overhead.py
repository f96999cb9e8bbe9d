"""Smoke test of benchmarks/step_overhead.py: its quick mode runs every provider's phases and prints its tables
(without a GPU: the fake-driver measurement, in a subprocess, since the suite's conftest turns the Triton
interpreter on in-process)."""

import ast
import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "step_overhead.py")


def test_step_overhead_quick_mode_prints_its_tables():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALORA_FAST_BACKEND")}
    # (AdamW fused, the Trainer's default; the default foreach differs only in AdamW's argument)
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--cpu", "--profile", "--profile-top", "3", "--optimizer",
                          "fused"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    assert "AdamW fused;" in text, text[:1500]
    for row in ("PEFT LoRA (r 8)", "stock PEFT AdaLoRA (r 12)", "adalora-fast (patched PEFT, r 12)",
                "forward + loss + penalty", "backward", "optimizer", "allocator", "zero_grad",
                "FastPeftSVDLinear (the patched PEFT layer)", "FastSVDLinear", "## Targets",
                "Where adalora-fast (patched PEFT, r 12)'s host time goes"):  # fmt: skip
        assert row in text, row
    # the floor: the model without adapters runs fewer ops than any adapted model, and no kernels
    rows = {}  # the first table's rows (the per-step table), by provider
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" |")[0][2:], line.split("|")[2:-1])
    floor, lora = rows["the frozen model, no adapters (the floor; forward + backward only)"], rows["PEFT LoRA (r 8)"]
    assert int(floor[3]) < int(lora[3]) and floor[4].strip() == "0", (floor, lora)
    assert "leaves its adapted modules and penalty" in text
    # fused AdamW: the same ops for 28 tensors as for 42 (foreach's loop over tensors costs more ops with more)
    optimizer = next(line for line in text.splitlines() if line.startswith("| optimizer |")).split("|")[-5:-1]
    assert len(set(optimizer)) == 1 and int(optimizer[0]) > 0, optimizer
    # adalora-fast's step ran the kernels (14 adapted modules: 2 launches forward, 3 backward) and the extension op
    # adalora-fast's step ran the kernels (14 adapted modules: 2 launches forward, 3 backward), as one C++ node per
    # layer call (launch programs) and, with programs off, from Python: the same launches in each phase
    for label in ("adalora-fast (patched PEFT, r 12)", "adalora-fast, launch programs off (each layer launches "
                  "from Python)"):  # fmt: skip
        assert rows[label][-1].strip() == "70", rows[label]
    for phase, launches in (("forward + loss + penalty", 28), ("backward", 42)):
        cells = next(line for line in text.splitlines() if line.startswith(f"| {phase} |")).split("|")[-3:-1]
        assert all(cell.strip().endswith(f"(+{launches})") for cell in cells), (phase, cells)
    counted = re.search(r"fake driver: (\d+) launches; counted by path: (\{.*\})", text)
    assert counted, text[-600:]
    by_path = ast.literal_eval(counted.group(2))
    assert by_path["program"] > 0 and sum(by_path.values()) == int(counted.group(1)), counted.group(0)
    assert re.search(r"'orth_penalty': \{'extension': \d+\}", text), text[-600:]
