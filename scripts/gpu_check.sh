#!/usr/bin/env bash
# The one thing to run on a GPU machine: requirements, build, environment report, the GPU tests, the headline
# benchmarks and a profile of the ~1B training step, offline (nothing is downloaded), in at most
# $GPU_CHECK_BUDGET seconds (default 480, Triton's cache cold, on one H200).
#
#   RESULTS=<dir> bash scripts/gpu_check.sh [all|tests|bench|profile] [extra pytest arguments for the tests]
#   bash scripts/gpu_check.sh budget      # each stage's share of the budget, and the sum
#
# Stages, in order, each with its share of the budget (STAGE_SHARES); a stage that fails or runs out of time is
# recorded and the next one runs:
#   preflight      every requirement (scripts/gpu_summary.py requirements), named in one line. Without torch
#                  (with CUDA on a GPU machine), triton, pytest or setuptools >= 64 the check stops there;
#                  without another, the stages that need it are skipped (pytest-xdist: the tests run in one
#                  process; hypothesis: the modules that use it fail to collect, by name)
#   build          the package, editable and without the extension (PIP_NO_INDEX=1), unless it is installed
#                  from this checkout; then the extension in place (setup.py build_ext --inplace, for the
#                  visible GPU only), unless built from the same inputs (scripts/install_plan.py). A failed
#                  extension build fails the stage and the rest runs on: the library loads without it
#   env            adalora_fast.env_report(), versions, nvidia-smi
#   tests          every test module whose behaviour depends on the device (the ones that mention CUDA or take
#                  DEVICE from tests/tooling/device.py; the compile tests build their whole matrix), in
#                  parallel (pytest-xdist: a crashing test fails alone; the extension's error paths run in a
#                  child process of their own); GPU_CHECK_FULL=1 adds the rest of the suite (tests_rest) with
#                  what is left of the budget (raise GPU_CHECK_BUDGET for it)
#   bench_step     the ~1B training step for PEFT LoRA, stock PEFT AdaLoRA, adalora-fast and both CUDA-graph
#                  providers, with peak memory
#   bench_layer    the layer at 2048 and 8192×4096→4096 and 8192×4096→14336 (bf16, r 12)
#   bench_kernels  the adapter's kernels alone: HBM bandwidth against the card's peak, and their results
#   report         the BENCHMARKS.md section and the plots (benchmarks/report.py)
#   profile        benchmarks/profile_step.py on the ~1B step
#   host_overhead  benchmarks/host_overhead.py: one layer call's host time by part
# After every stage, $RESULTS gets SUMMARY.md (its first screen: what is missing or did not build, the stages,
# whether the adapter ran the kernels in the tests and in each benchmark provider, the layer and training-step
# tables, the failed tests by name) and gpu-check-logs.tar.gz (every log, junit XML, benchmark JSON, the
# profile, the BENCHMARKS.md section and plots), plus bench.json, BENCHMARKS-section.md and profile.md,
# whatever happens to the later stages. Without a GPU the GPU stages shrink to smoke runs (small shapes;
# GPU_CHECK_QUICK=1 also shrinks the tests), so the script itself can be tested on a CPU.
# GPU_CHECK_STAGES="build env tests ..." runs only the stages named. Exits non-zero if a requirement is
# missing or a stage failed or ran out of time (3 when the check stopped at its requirements).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

# ---- the time budget (seconds). Each stage's share, in the order the stages run; stage k must end by the sum
# ---- of the shares up to k (a stage that ends early or does not run leaves its time to the next), the
# ---- summary and the tarball take RESERVE after the last, and the whole check ends within BUDGET.
# The tests get the largest share: a first run must end green, and the last GPU test run (8 workers, cold Triton
# cache) reached 85 % in 210 s; the benchmarks, which come after, get what remains.
STAGE_SHARES=(preflight:30 build:60 env:10 tests:200 bench_step:70 bench_layer:35 bench_kernels:15 report:15
  profile:25 host_overhead:10)
RESERVE=10
BUDGET=${GPU_CHECK_BUDGET:-480} # 8 minutes: a lease is 15, its start-up included
GRACE_MAX=10                    # a stage gets SIGINT this long (at most) before its end, then SIGKILL

budget() { # each share, the reserve, their sum and the budget; fails when the sum exceeds the budget
  local entry sum=0
  for entry in "${STAGE_SHARES[@]}"; do
    printf '%-14s %4d\n' "${entry%%:*}" "${entry##*:}"
    sum=$((sum + ${entry##*:}))
  done
  sum=$((sum + RESERVE))
  printf '%-14s %4d\n%-14s %4d\n%-14s %4d\n' reserve "$RESERVE" sum "$sum" budget "$BUDGET"
  ((sum <= BUDGET))
}

# The end of stage NAME, in seconds after the start: the shares up to it (a stage outside the table, such as
# tests_rest, ends with the budget).
stage_end() {
  local entry end=0
  for entry in "${STAGE_SHARES[@]}"; do
    end=$((end + ${entry##*:}))
    [[ ${entry%%:*} == "$1" ]] && { echo $((end < BUDGET - RESERVE ? end : BUDGET - RESERVE)); return; }
  done
  echo $((BUDGET - RESERVE))
}

# ---- the stages' work (each runs as `bash scripts/gpu_check.sh __stage FUNCTION ARGS...` under `timeout`,
# ---- with LOGS, TEST_WORKERS and WHAT from the environment)

pytest_() { "$PY" -m pytest -p gpu_check_plugin -p no:cacheprovider -q -rfE "$@"; }
missing() { grep -q "^missing	$1	" "$LOGS/requirements.tsv" 2> /dev/null; } # (requirements.tsv: preflight)

installed_from_this_checkout() { # (from /, so that this checkout's own folder is not what Python finds)
  (cd / && "$PY" -c 'import importlib.util as u, os, sys
s = u.find_spec("adalora_fast")
sys.exit(0 if s and s.origin and os.path.dirname(os.path.realpath(s.origin)) == sys.argv[1] else 1)' \
    "$(realpath "$ROOT/adalora_fast")")
}

build_package() {
  if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
    echo "build skipped (GPU_CHECK_SKIP_BUILD=1)"
  elif [[ -z $("$PY" scripts/install_plan.py check-package) ]]; then
    echo "adalora-fast is installed from this checkout with the same build inputs: nothing to build"
  else
    # The package first, pure Python (seconds), so that a failed compile below leaves it importable.
    if ! installed_from_this_checkout; then
      ADALORA_FAST_BUILD_EXT=0 "$PY" -m pip install --no-deps --no-build-isolation -e . || return
    fi
    # The extension into the checkout, where the editable install loads it from.
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace && "$PY" scripts/install_plan.py stamp
  fi
}

build() { # the build, then whether adalora_fast._C loads (extension.txt), whatever the build did
  build_package
  local rc=$?
  "$PY" -c 'from adalora_fast import extension
m, err = extension.load_extension()
kind = "CUDA" if m and m.built_with_cuda() else "CPU only"
print(f"loaded ({kind})" if m else f"not loaded ({type(err).__name__}: {err})")' \
    > "$LOGS/extension.txt" 2>&1 || echo "not loaded (the package did not import)" > "$LOGS/extension.txt"
  echo "adalora_fast._C: $(cat "$LOGS/extension.txt")"
  return $rc
}

env_report() {
  "$PY" - "$LOGS/env.json" << 'PYEOF' || return 1
import datetime, json, subprocess, sys
import importlib.metadata as md
import adalora_fast
report = adalora_fast.env_report()
for name in ("peft", "transformers", "pytest-xdist"):
    try:
        report[name] = md.version(name)
    except md.PackageNotFoundError:
        report[name] = "not installed"
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
  local files options=()
  mapfile -t files <<< "$2"
  missing pytest-xdist || options+=(-n "$TEST_WORKERS" --dist loadgroup)
  missing pytest-benchmark || options+=(--benchmark-disable)
  GPU_CHECK_RESULTS=$LOGS/$1.jsonl pytest_ "${options[@]}" --continue-on-collection-errors \
    --junitxml="$LOGS/$1.xml" "${files[@]}" "${@:3}"
}

bench() { # bench NAME FILE [K-EXPRESSION]
  GPU_CHECK_RESULTS=$LOGS/$1.jsonl pytest_ "benchmarks/$2" --benchmark-only --benchmark-json="$LOGS/$1.json" ${3:+-k "$3"}
}

report() {
  local jsons=() f
  for f in "$LOGS"/bench_*.json; do [[ -f $f ]] && jsons+=("$f"); done
  ((${#jsons[@]})) || { echo "no benchmark JSON to report"; return 1; }
  "$PY" scripts/gpu_summary.py merge "${jsons[@]}" --out "$LOGS/bench.json" &&
    "$PY" benchmarks/report.py "$LOGS/bench.json" --out "$LOGS/BENCHMARKS-section.md" --plots "$LOGS/plots" \
      --command "bash scripts/gpu_check.sh $WHAT"
}

case ${1:-} in
  __stage)
    "${@:2}"
    exit $?
    ;;
  budget)
    budget
    exit $?
    ;;
esac

# ---- the driver

WHAT=${1:-all}
case $WHAT in all | tests | bench | profile) ;; *) echo "usage: bash scripts/gpu_check.sh [all|tests|bench|profile|budget] [pytest args]" >&2; exit 2 ;; esac
EXTRA=("${@:2}")
RESULTS=${RESULTS:-gpu-results}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
LOGS=${GPU_CHECK_LOGS:-$ROOT/build/gpu-check-logs}
rm -rf "$LOGS" && mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
rm -f "$RESULTS"/{SUMMARY.md,gpu-check-logs.tar.gz,bench.json,BENCHMARKS-section.md,profile.md}
START=$(date +%s)
STATUS=0
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LOGS WHAT
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" # gpu_check_plugin for pytest
budget | tr -s ' ' | paste -sd ' ' | sed 's/^/budget (s): /'

summarize() {
  "$PY" scripts/gpu_summary.py --logs "$LOGS" --out "$RESULTS/SUMMARY.md" 2> "$LOGS/summary.err" ||
    { echo "# GPU check"; echo; echo "The summary failed:"; cat "$LOGS/summary.err" "$LOGS/stages.tsv"; } > "$RESULTS/SUMMARY.md"
  local f
  for f in bench.json BENCHMARKS-section.md profile.md; do [[ -f $LOGS/$f ]] && cp "$LOGS/$f" "$RESULTS/$f"; done
  tar -czf "$RESULTS/gpu-check-logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2> /dev/null
}
trap 'summarize; exit 130' INT TERM

skipped() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$LOGS/stages.tsv"; }

# stage NAME NEEDS COMMAND...: COMMAND until the stage's end (stage_end), its output in $LOGS/NAME.log;
# skipped when a requirement in NEEDS (comma-separated, "-" for none) is missing. NOTE, when set, goes with
# the stage's line in SUMMARY.md.
stage() {
  local name=$1 needs=$2 need
  shift 2
  [[ $name == preflight || " ${GPU_CHECK_STAGES:-$name} " == *" $name "* ]] || return 0 # (preflight: always)
  for need in ${needs//,/ }; do
    if [[ $need != - ]] && missing "$need"; then
      skipped "$name" "needs $need"
      return
    fi
  done
  local limit=$(($(stage_end "$name") - ($(date +%s) - START))) t0=$SECONDS rc status grace
  if ((limit < 5)); then
    skipped "$name" "no time left in the $BUDGET s budget"
    STATUS=1
    return
  fi
  grace=$((limit / 5 < GRACE_MAX ? limit / 5 : GRACE_MAX))
  echo "== $name (at most $limit s)"
  # SIGINT first, so that pytest ends its session properly (junit XML, benchmark JSON); KILL at the limit.
  timeout --signal=INT --kill-after="$grace" "$((limit - grace))" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed (exit $rc)" ;;
  esac
  ((rc == 0)) || STATUS=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "${NOTE:-}" >> "$LOGS/stages.tsv"
  echo "   $status in $((SECONDS - t0)) s: $(tail -n 1 "$LOGS/$name.log" | cut -c1-160)"
  summarize
}
SELF=(bash scripts/gpu_check.sh __stage)

stage preflight - "$PY" scripts/gpu_summary.py requirements --logs "$LOGS"
if grep -q "^missing	" "$LOGS/requirements.tsv" 2> /dev/null; then
  STATUS=1
  cat "$LOGS/preflight.log"
fi
if grep -qx "stop	1" "$LOGS/requirements.tsv" 2> /dev/null; then
  summarize
  cat "$RESULTS/SUMMARY.md"
  exit 3
fi
CUDA=$(awk -F'\t' '$1 == "cuda" { print $2 }' "$LOGS/requirements.tsv" 2> /dev/null)
[[ -n $CUDA ]] || CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
QUICK=${GPU_CHECK_QUICK:-$((1 - CUDA))}
if ((CUDA)); then
  # 12 of the 16 cores (the last run had 8 and reached 85 % of the suite in 210 s): from a cold Triton
  # cache every worker compiles kernels on its own cores.
  export TEST_WORKERS=${GPU_CHECK_WORKERS:-12}
  LAYER_K=${GPU_CHECK_LAYER_K:-2048x4096x4096 or 8192x4096x4096 or 8192x4096x14336}
  STEP_K=${GPU_CHECK_STEP_K:-llama_1b-0.0}
  PROFILE_ARGS=(--model llama_1b --providers "${GPU_CHECK_PROFILE_PROVIDERS:-peft_lora,adalora_fast,adalora_fast_graph}" --steps 3)
else # smoke runs of every stage
  export TEST_WORKERS=${GPU_CHECK_WORKERS:-2}
  LAYER_K=${GPU_CHECK_LAYER_K:-300x77x130 and 0.0}
  STEP_K=${GPU_CHECK_STEP_K:-tiny-0.0 and (peft_lora or adalora_fast)}
  PROFILE_ARGS=(--model tiny --providers "${GPU_CHECK_PROFILE_PROVIDERS:-peft_lora,adalora_fast}" --steps 1)
fi
TESTS_NOTE=""
missing pytest-xdist && TESTS_NOTE="in one process (no pytest-xdist)"
# The device-dependent test modules: those that mention CUDA or take their device from tests/tooling/device.py
# (the others behave the same on a CPU).
if [[ -n ${GPU_CHECK_TESTS:-} ]]; then
  GPU_TESTS=$(tr ' ' '\n' <<< "$GPU_CHECK_TESTS")
elif ((QUICK)); then
  GPU_TESTS=$'tests/test_isolated.py\ntests/test_orth_penalty_op.py::test_bad_inputs_raise_and_never_crash'
else
  GPU_TESTS=$(grep -l -i -E 'cuda|from tooling.device import' tests/test_*.py)
fi
REST_TESTS=$(for f in tests/test_*.py; do grep -qxF "$f" <<< "$GPU_TESTS" || echo "$f"; done)

stage build - "${SELF[@]}" build
stage env - "${SELF[@]}" env_report
if [[ $WHAT == all || $WHAT == tests ]]; then
  # The ahead-of-time compile tests build their whole matrix here (with this machine's Triton, nvcc and cores).
  ADALORA_FAST_FULL_COMPILE_MATRIX=1 NOTE=$TESTS_NOTE stage tests - "${SELF[@]}" run_tests tests "$GPU_TESTS" "${EXTRA[@]}"
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  stage bench_step pytest-benchmark,peft,transformers "${SELF[@]}" bench bench_step test_bench_training_step.py "$STEP_K"
  stage bench_layer pytest-benchmark,peft "${SELF[@]}" bench bench_layer test_bench_svd_linear.py "$LAYER_K"
  stage bench_kernels pytest-benchmark "${SELF[@]}" bench bench_kernels test_bench_adapter_kernels.py
  stage report pytest-benchmark "${SELF[@]}" report # matplotlib plots: ~10 s on an idle host
fi
if [[ $WHAT == all || $WHAT == profile ]]; then
  stage profile peft,transformers "$PY" benchmarks/profile_step.py "${PROFILE_ARGS[@]}" --out "$LOGS/profile.md"
  # the host time of one layer call by part, kernel[grid] against CachedLauncher (markdown in its log)
  stage host_overhead peft "$PY" benchmarks/host_overhead.py --quick --tables layers,levels,profile
fi
if [[ ${GPU_CHECK_FULL:-0} == 1 && ($WHAT == all || $WHAT == tests) && -n $REST_TESTS ]]; then
  NOTE=$TESTS_NOTE stage tests_rest - "${SELF[@]}" run_tests tests_rest "$REST_TESTS" "${EXTRA[@]}"
fi
summarize
echo "== $(($(date +%s) - START)) s in all; $RESULTS/SUMMARY.md:"
cat "$RESULTS/SUMMARY.md"
exit $STATUS
