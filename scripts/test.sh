#!/usr/bin/env bash
# The test suite: install, then run pytest over tests/ and benchmarks/ (benchmarks as one-call smoke tests).
# Extra arguments go to pytest. pytest's exit code 5 (no test collected) fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest --benchmark-disable "$@"
