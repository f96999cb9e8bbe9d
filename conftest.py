"""Test and benchmark configuration shared by tests/ and benchmarks/ (also when only one of them runs).

Both folders import each other's helpers (``tooling`` from tests/, ``bench_common`` from benchmarks/), and
without a GPU the Triton kernels run in the interpreter, which must be on before triton is imported.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
for folder in ("tests", "benchmarks"):
    if os.path.join(ROOT, folder) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, folder))

from tooling.device import enable_interpreter_if_no_gpu  # noqa: E402

enable_interpreter_if_no_gpu()
