"""Smoke test of benchmarks/host_overhead.py: its quick mode runs and prints its tables (CI has no GPU, so this is
the fake-driver measurement, in a subprocess: the suite's conftest turns the Triton interpreter on in-process)."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "host_overhead.py")


def test_host_overhead_quick_mode_prints_its_tables():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALORA_FAST_BACKEND")}
    out = subprocess.run([sys.executable, SCRIPT, "--quick", "--cpu"], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    for row in ("nn.Linear (frozen)", "PEFT LoRA Linear", "PEFT AdaLoRA SVDLinear", "FastSVDLinear, kernel[grid]",
                "FastSVDLinear, CachedLauncher", "svd_adapter_forward", "shrink launch: CachedLauncher"):
        assert row in text, row
    assert "plain elsewhere: 0)" in text  # outside the kernel[grid] rows, every launch took the direct path
