#!/usr/bin/env bash
# On a CUDA machine whose Python already has torch, triton, peft, transformers, pytest, pytest-benchmark and
# ninja: install adalora-fast (building the CUDA extension), then run the test suite, the benchmarks, or
# both, and profile the training step (where the time goes: host, kernels), keeping the logs, bench.json, a
# BENCHMARKS.md section, the plots, profile.md and host_overhead.md in $RESULTS (default gpu-results/).
# Usage: bash scripts/gpu_check.sh [tests|bench|profile|all] [pytest arguments, e.g. -k training_step].
# Exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-gpu-results}
WHAT=${1:-all}
case $WHAT in tests | bench | profile | all) ;; *) echo "usage: bash scripts/gpu_check.sh [tests|bench|profile|all]" >&2; exit 2 ;; esac
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
"$PY" -c "import json, adalora_fast; print(json.dumps(adalora_fast.env_report(), indent=1))" | tee "$RESULTS/env.json"
status=0
if [[ $WHAT == tests || $WHAT == all ]]; then
  "$PY" -m pytest tests -q "${@:2}" 2>&1 | tee "$RESULTS/tests.log"
  status=$((status | PIPESTATUS[0]))
fi
if [[ $WHAT == bench || $WHAT == all ]]; then
  "$PY" -m pytest benchmarks --benchmark-only --benchmark-json="$RESULTS/bench.json" "${@:2}" 2>&1 | tee "$RESULTS/bench.log"
  status=$((status | PIPESTATUS[0]))
  "$PY" benchmarks/report.py "$RESULTS/bench.json" --out "$RESULTS/BENCHMARKS.md" --plots "$RESULTS/plots" \
    --command "bash scripts/gpu_check.sh $*" || status=1
fi
if [[ $WHAT == profile || $WHAT == all ]]; then
  # the host time of one layer call, part by part (small shapes: the host, not the kernels, sets the time)
  "$PY" benchmarks/host_overhead.py > "$RESULTS/host_overhead.md" 2> "$RESULTS/host_overhead.log" \
    || { status=1; tail -20 "$RESULTS/host_overhead.log"; }
  for model in llama_160m llama_1b; do
    "$PY" benchmarks/profile_step.py --model "$model" --out "$RESULTS/profile.md" > "$RESULTS/profile_$model.log" 2>&1 \
      || { status=1; tail -20 "$RESULTS/profile_$model.log"; }
  done
fi
exit $status
