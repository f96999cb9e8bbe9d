#!/usr/bin/env bash
# The test suite: install what is missing (scripts/install.sh), then run pytest over tests/ and benchmarks/
# (benchmarks as one-call smoke tests) on every core, up to 8 (pytest-xdist; PYTEST_WORKERS=N to choose, 0 for
# one process). Extra arguments go to pytest. pytest's exit code 5 (no test collected) fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
cores=$(nproc 2> /dev/null || echo 2)
# One worker per core, at most 8 (each holds torch, transformers and PEFT: 1-2 GB).
exec "${PYTHON:-python3}" -m pytest --benchmark-disable -n "${PYTEST_WORKERS:-$((cores < 8 ? cores : 8))}" --dist loadgroup "$@"
