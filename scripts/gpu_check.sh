#!/usr/bin/env bash
# The one thing to run on a GPU machine: build, environment report, the GPU tests, the headline benchmarks
# and a profile of the ~1B training step, in at most $GPU_CHECK_BUDGET seconds (default 420: about 5–6
# minutes on one H200 including the build), offline (nothing is downloaded).
#
#   RESULTS=<dir> bash scripts/gpu_check.sh [all|tests|bench|profile] [extra pytest arguments for the tests]
#
# Stages, each with its own time limit (and all together within the budget); a stage that fails or runs out
# of time is recorded and the next one runs:
#   build    pip install --no-build-isolation -e . (PIP_NO_INDEX=1; the extension for the visible GPU only),
#            skipped when this checkout is already installed from the same inputs (scripts/install_plan.py)
#   env      adalora_fast.env_report(), versions, nvidia-smi
#   tests    every test module whose behaviour depends on the device (the ones that mention CUDA), in
#            parallel (pytest-xdist: a crashing test fails alone; the extension's error paths run in a child
#            process of their own); GPU_CHECK_FULL=1 adds the rest of the suite with the time left
#   bench    the layer at 2048 and 8192×4096→4096 and 8192×4096→14336 (bf16, r 12); the ~1B training step
#            for PEFT LoRA, stock PEFT AdaLoRA, adalora-fast and both CUDA-graph providers, with peak memory
#   profile  benchmarks/profile_step.py on the ~1B step, then benchmarks/host_overhead.py (one layer call's
#            host time by part, with torch.profiler's CPU self time per op)
# After every stage, $RESULTS gets SUMMARY.md (one screen: stages, passed/failed tests, the ratio tables,
# the backend each provider ran on) and gpu-check-logs.tar.gz (every log, junit XML, benchmark JSON, the
# profile, the BENCHMARKS.md section and plots), plus bench.json, BENCHMARKS-section.md and profile.md: five
# files, whatever happens to the later stages. Without a GPU the GPU stages shrink to smoke runs (small
# shapes; GPU_CHECK_QUICK=1 also shrinks the tests), so the script itself can be tested on a CPU.
# GPU_CHECK_STAGES="build env tests ..." runs only the stages named. Exits non-zero if any stage failed or ran
# out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
PYTEST=("$PY" -m pytest -p gpu_check_plugin -p no:cacheprovider -q -rfE)

# ---- the stages' work (each runs as `bash scripts/gpu_check.sh __stage FUNCTION ARGS...` under `timeout`,
# ---- with LOGS, TEST_WORKERS and WHAT from the environment)

build() {
  if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
    echo "build skipped (GPU_CHECK_SKIP_BUILD=1)"
  elif [[ -z $("$PY" scripts/install_plan.py check-package) ]]; then
    echo "adalora-fast is installed from this checkout with the same build inputs: nothing to build"
  else
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-deps --no-build-isolation -e . &&
      "$PY" scripts/install_plan.py stamp
  fi
}

env_report() {
  "$PY" - "$LOGS/env.json" << 'PYEOF' || return 1
import datetime, json, subprocess, sys
import importlib.metadata as md
import adalora_fast
from adalora_fast import extension
report = adalora_fast.env_report()
for name in ("peft", "transformers", "pytest-xdist"):
    try:
        report[name] = md.version(name)
    except md.PackageNotFoundError:
        report[name] = "not installed"
module, err = extension.load_extension()
report["extension"] = f"loaded, CUDA {module.built_with_cuda()}" if module else f"not loaded: {err}"
report["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
try:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    report["commit"] = git.stdout.strip() or "unknown"
except OSError:
    report["commit"] = "unknown"
print(json.dumps(report, indent=1))
json.dump(report, open(sys.argv[1], "w"), indent=1)
PYEOF
  if command -v nvidia-smi > /dev/null; then nvidia-smi; fi
}

run_tests() { # run_tests NAME FILES(newline-separated) [pytest args]
  local files
  mapfile -t files <<< "$2"
  GPU_CHECK_RESULTS=$LOGS/$1.jsonl "${PYTEST[@]}" -n "$TEST_WORKERS" --dist loadgroup --benchmark-disable \
    --junitxml="$LOGS/$1.xml" "${files[@]}" "${@:3}"
}

bench() { # bench NAME FILE K-EXPRESSION
  GPU_CHECK_RESULTS=$LOGS/$1.jsonl "${PYTEST[@]}" "benchmarks/$2" --benchmark-only \
    --benchmark-json="$LOGS/$1.json" -k "$3"
}

report() {
  local jsons=() f
  for f in "$LOGS"/bench_*.json; do [[ -f $f ]] && jsons+=("$f"); done
  ((${#jsons[@]})) || { echo "no benchmark JSON to report"; return 1; }
  "$PY" scripts/gpu_summary.py merge "${jsons[@]}" --out "$LOGS/bench.json" &&
    "$PY" benchmarks/report.py "$LOGS/bench.json" --out "$LOGS/BENCHMARKS-section.md" --plots "$LOGS/plots" \
      --command "bash scripts/gpu_check.sh $WHAT"
}

if [[ ${1:-} == __stage ]]; then
  "${@:2}"
  exit $?
fi

# ---- the driver

WHAT=${1:-all}
case $WHAT in all | tests | bench | profile) ;; *) echo "usage: bash scripts/gpu_check.sh [all|tests|bench|profile] [pytest args]" >&2; exit 2 ;; esac
EXTRA=("${@:2}")
RESULTS=${RESULTS:-gpu-results}
BUDGET=${GPU_CHECK_BUDGET:-420}
RESERVE=15 # seconds kept for the summary and the tarball
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
LOGS=${GPU_CHECK_LOGS:-$ROOT/build/gpu-check-logs}
rm -rf "$LOGS" && mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
rm -f "$RESULTS"/{SUMMARY.md,gpu-check-logs.tar.gz,bench.json,BENCHMARKS-section.md,profile.md}
START=$(date +%s)
STATUS=0
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LOGS WHAT
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" # gpu_check_plugin for pytest

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
QUICK=${GPU_CHECK_QUICK:-$((1 - CUDA))}
if ((CUDA)); then
  export TEST_WORKERS=${GPU_CHECK_WORKERS:-8}
  LAYER_K=${GPU_CHECK_LAYER_K:-2048x4096x4096 or 8192x4096x4096 or 8192x4096x14336}
  STEP_K=${GPU_CHECK_STEP_K:-llama_1b-0.0}
  PROFILE_ARGS=(--model llama_1b --providers "${GPU_CHECK_PROFILE_PROVIDERS:-peft_lora,peft_adalora,adalora_fast,adalora_fast_graph}" --steps 3)
else # smoke runs of every stage
  export TEST_WORKERS=${GPU_CHECK_WORKERS:-2}
  LAYER_K=${GPU_CHECK_LAYER_K:-300x77x130 and 0.0}
  STEP_K=${GPU_CHECK_STEP_K:-tiny-0.0 and (peft_lora or adalora_fast)}
  PROFILE_ARGS=(--model tiny --providers "${GPU_CHECK_PROFILE_PROVIDERS:-peft_lora,adalora_fast}" --steps 1)
fi
# The device-dependent test modules: those that mention CUDA (the others behave the same on a CPU).
if [[ -n ${GPU_CHECK_TESTS:-} ]]; then
  GPU_TESTS=$(tr ' ' '\n' <<< "$GPU_CHECK_TESTS")
elif ((QUICK)); then
  GPU_TESTS=$'tests/test_isolated.py\ntests/test_orth_penalty_op.py::test_bad_inputs_raise_and_never_crash'
else
  GPU_TESTS=$(grep -l -i cuda tests/test_*.py)
fi
REST_TESTS=$(for f in tests/test_*.py; do grep -qxF "$f" <<< "$GPU_TESTS" || echo "$f"; done)

summarize() {
  "$PY" scripts/gpu_summary.py --logs "$LOGS" --out "$RESULTS/SUMMARY.md" 2> "$LOGS/summary.err" ||
    { echo "# GPU check"; echo; echo "The summary failed:"; cat "$LOGS/summary.err" "$LOGS/stages.tsv"; } > "$RESULTS/SUMMARY.md"
  local f
  for f in bench.json BENCHMARKS-section.md profile.md; do [[ -f $LOGS/$f ]] && cp "$LOGS/$f" "$RESULTS/$f"; done
  tar -czf "$RESULTS/gpu-check-logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2> /dev/null
}
trap 'summarize; exit 130' INT TERM

# stage NAME LIMIT COMMAND...: COMMAND within min(LIMIT, the budget left) seconds, its output in $LOGS/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  [[ " ${GPU_CHECK_STAGES:-$name} " == *" $name "* ]] || return 0
  local left=$((BUDGET - ($(date +%s) - START) - RESERVE)) t0=$SECONDS rc status
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    printf '%s\tskipped\t0\tno time left in the %s s budget\n' "$name" "$BUDGET" >> "$LOGS/stages.tsv"
    STATUS=1
    return
  fi
  echo "== $name (at most $limit s)"
  # SIGINT first, so that pytest ends its session properly (junit XML, benchmark JSON); KILL 20 s later.
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  ((rc == 0)) || STATUS=1
  printf '%s\t%s\t%s\t\n' "$name" "$status" "$((SECONDS - t0))" >> "$LOGS/stages.tsv"
  echo "   $status in $((SECONDS - t0)) s: $(tail -n 1 "$LOGS/$name.log" | cut -c1-160)"
  summarize
}
SELF=(bash scripts/gpu_check.sh __stage)

stage build 180 "${SELF[@]}" build
stage env 60 "${SELF[@]}" env_report
if [[ $WHAT == all || $WHAT == tests ]]; then
  # The ahead-of-time Triton compile check is the same on any machine (and long): the CPU suite runs it.
  stage tests 170 "${SELF[@]}" run_tests tests "$GPU_TESTS" \
    --deselect tests/test_svd_adapter_kernels.py::test_every_kernel_compiles_for_sm90_and_sm80_with_tensor_cores "${EXTRA[@]}"
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  stage bench_step 130 "${SELF[@]}" bench bench_step test_bench_training_step.py "$STEP_K"
  stage bench_layer 80 "${SELF[@]}" bench bench_layer test_bench_svd_linear.py "$LAYER_K"
  stage report 90 "${SELF[@]}" report  # matplotlib plots: ~10 s on an idle host, far more on a busy one
fi
if [[ $WHAT == all || $WHAT == profile ]]; then
  stage profile 80 "$PY" benchmarks/profile_step.py "${PROFILE_ARGS[@]}" --out "$LOGS/profile.md"
  # the host time of one layer call by part, kernel[grid] against CachedLauncher (markdown in its log)
  stage host_overhead 40 "$PY" benchmarks/host_overhead.py --quick --tables layers,levels,profile
fi
if [[ ${GPU_CHECK_FULL:-0} == 1 && ($WHAT == all || $WHAT == tests) && -n $REST_TESTS ]]; then
  stage tests_rest 600 "${SELF[@]}" run_tests tests_rest "$REST_TESTS" "${EXTRA[@]}"
fi
summarize
echo "== $(($(date +%s) - START)) s in all; $RESULTS/SUMMARY.md:"
cat "$RESULTS/SUMMARY.md"
exit $STATUS
