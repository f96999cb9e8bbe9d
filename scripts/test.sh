#!/usr/bin/env bash
# The test suite: install what is missing (scripts/install.sh), then run pytest over tests/ and benchmarks/
# (benchmarks as one-call smoke tests) on every core (pytest-xdist; PYTEST_WORKERS=N to choose, 0 for one
# process). Extra arguments go to pytest. pytest's exit code 5 (no test collected) fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest --benchmark-disable -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
