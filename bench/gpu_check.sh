#!/usr/bin/env bash
# The one prepared GPU check (a session lent an H100/H200 for ~15 minutes runs it once, from the repo root):
#
#   bash bench/gpu_check.sh                 # results in $OUT if set, else bench/gpu_check_out/<UTC time>/
#   DRY_RUN=1 OUT=/tmp/gc bash bench/gpu_check.sh   # CPU: the same steps, tiny and CPU-sized (tests use it)
#   STEPS_ONLY=env,throughput bash bench/gpu_check.sh   # only these steps (the others are recorded as skipped)
#
# Steps, each with its own `timeout` budget (seconds), all inside TOTAL_BUDGET (default 470 s < 8 min); a step
# is cut to what is left of the total, and skipped (recorded so) when under 10 s are left. BUDGET_SCALE
# multiplies every budget (default 1; 20 in a dry run, whose loaded CPU is no guide to a GPU's times):
#   env         torch / CUDA / nvcc / triton / device, and which op backends this process has     (30)
#   build       FASTCOLLAB_REQUIRE_EXT=1 setup.py build_ext --inplace: _C with its CUDA kernels   (150)
#   backends    after the build: `python -m fastcollab._ext` (cpp CUDA kernels must say yes)      (20)
#   cuda_tests  pytest -m cuda (graphed fp32 vs eager fp32, seeds, sync-free replay, train e2e)  (140)
#   throughput  bench.throughput --compare, 2x ResNet-18 MAT batch 128: eager fp32 / eager bf16 /
#               fast (graphed bf16), fallback_reason, captures/replays, TF32, per-engine memory   (90)
#   profile     torch.profiler over 3 replayed steps: kernels per step, GPU busy %, top kernels    (45)
#   throughput_wrn34  the same for WRN-34-10, if the budget still allows                         (rest)
# Everything goes to one folder: <step>.log per step, steps.jsonl (name, budget, rc, seconds, status), the
# steps' JSON files, and summary.json. Exit status: 0 when every step that ran passed.
# No network is needed (nothing is installed): the machine's Python must already have a CUDA torch.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DRY=${DRY_RUN:-0}
OUT_DIR=${OUT:-bench/gpu_check_out/$(date -u +%Y%m%dT%H%M%SZ)}
if [[ "$DRY" == "1" ]]; then BUDGET_SCALE=${BUDGET_SCALE:-20}; else BUDGET_SCALE=${BUDGET_SCALE:-1}; fi
TOTAL_BUDGET=${TOTAL_BUDGET:-$(( 470 * BUDGET_SCALE ))}
mkdir -p "$OUT_DIR"
STEPS="$OUT_DIR/steps.jsonl"
: > "$STEPS"
START=$(date +%s)

# step NAME BUDGET_S COMMAND...: run COMMAND under `timeout`, log to NAME.log, append its record to steps.jsonl
step() {
  local name=$1 budget=$(( $2 * BUDGET_SCALE ))
  shift 2
  if [[ -n "${STEPS_ONLY:-}" && ",$STEPS_ONLY," != *",$name,"* ]]; then
    printf '{"name": "%s", "budget_s": %d, "rc": null, "seconds": 0, "status": "skipped (not in STEPS_ONLY)"}\n' \
      "$name" "$budget" >> "$STEPS"
    return 0
  fi
  local left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
  if (( budget > left )); then
    budget=$left
  fi
  if (( budget < 10 )); then
    printf '{"name": "%s", "budget_s": %d, "rc": null, "seconds": 0, "status": "skipped (total budget spent)"}\n' \
      "$name" "$budget" >> "$STEPS"
    echo "[gpu_check] $name: skipped, total budget spent"
    return 0
  fi
  echo "[gpu_check] $name (budget ${budget}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '{"name": "%s", "budget_s": %d, "rc": %d, "seconds": %d, "status": "%s"}\n' \
    "$name" "$budget" "$rc" "$(( $(date +%s) - t0 ))" "$status" >> "$STEPS"
  echo "[gpu_check] $name: $status (rc $rc, $(( $(date +%s) - t0 ))s) -> $OUT_DIR/$name.log"
  tail -n 3 "$OUT_DIR/$name.log"
}

# the step's command line: full size on a GPU, CPU-sized in a dry run
if [[ "$DRY" == "1" ]]; then
  DEV=cpu; MODEL=smallcnn; BATCH=8; WARM=0; STEPS_N=2; PROF_STEPS=2; WRN=smallcnn
  BUILD=("$PY" -c "import fastcollab._cuda_toolkit as t; print('dry run: no build; nvcc:', t.find_nvcc())")
  TESTS=("$PY" -m pytest -q -m cuda --collect-only tests/test_engine_graphed_cuda.py)
  THR_EXTRA=(--no-flops --device cpu)
else
  DEV=cuda; MODEL=resnet18; BATCH=128; WARM=5; STEPS_N=10; PROF_STEPS=3; WRN=wrn-34-10
  BUILD=(env FASTCOLLAB_REQUIRE_EXT=1 "$PY" setup.py build_ext --inplace)
  TESTS=("$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider --junitxml="$OUT_DIR/cuda_tests.xml")
  THR_EXTRA=()
fi

step env 30 "$PY" -m bench.gpu_check env "$OUT_DIR/env.json"
step build 150 "${BUILD[@]}"
step backends 20 "$PY" -m fastcollab._ext
step cuda_tests 140 "${TESTS[@]}"
step throughput 90 "$PY" -m bench.throughput --compare --method mat --peers 2 --model "$MODEL" \
  --batch-size "$BATCH" --warmup "$WARM" --steps "$STEPS_N" "${THR_EXTRA[@]}" --json "$OUT_DIR/throughput.json"
step profile 45 "$PY" -m bench.gpu_check profile --engine fast --model "$MODEL" --batch-size "$BATCH" \
  --warmup "$WARM" --steps "$PROF_STEPS" --device "$DEV" --json "$OUT_DIR/profile.json"
step throughput_wrn34 120 "$PY" -m bench.throughput --compare --method mat --peers 2 --model "$WRN" \
  --batch-size "$BATCH" --warmup "$WARM" --steps "$(( STEPS_N / 2 > 0 ? STEPS_N / 2 : 1 ))" "${THR_EXTRA[@]}" \
  --json "$OUT_DIR/throughput_wrn34.json"

"$PY" -m bench.gpu_check summarize "$OUT_DIR"
rc=$?
echo "[gpu_check] total $(( $(date +%s) - START ))s; results in $OUT_DIR (summary.json)"
exit $rc
