#!/usr/bin/env bash
# GPU check of aiayn on a machine with a CUDA GPU, torch preinstalled and no network:
#   scripts/cuda_check.sh OUTDIR
# Builds the extension in place for the local GPU only, prints build_info, runs the whole test
# suite, compute-sanitizer (memcheck, racecheck, synccheck) on a small CUDA test subset when
# compute-sanitizer is there, the CUDA benchmark when aiayn/bench exists, and ends with a summary
# table (step, status, seconds). Logs go to OUTDIR. Keeps going past a failed step; exits non-zero
# if any step failed. Sized to finish within 10 minutes on an H100 (a global deadline caps the
# steps).
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
BUDGET_S=${CUDA_CHECK_BUDGET_S:-570}  # leaves half a minute of the 10 for the summary and slack
DEADLINE=$((START + BUDGET_S))
STEPS=()
STATUSES=()
SECONDS_TAKEN=()
FAILED=0

record() {  # name status seconds
  STEPS+=("$1")
  STATUSES+=("$2")
  SECONDS_TAKEN+=("$3")
  if [ "$2" = FAIL ] || [ "$2" = TIMEOUT ]; then FAILED=1; fi
}

# run_step NAME CAP_SECONDS LOG COMMAND...: runs COMMAND under a timeout (the smaller of CAP and the
# time left before the deadline), output to LOG and to the terminal.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local now left limit t0 rc
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -le 5 ]; then
    echo "== $name: no time left before the deadline" | tee "$log"
    record "$name" TIMEOUT 0
    return 1
  fi
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$dt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "== $name: timed out after ${limit}s" | tee -a "$log"
    record "$name" TIMEOUT "$dt"
  else
    echo "== $name: failed (exit $rc), log: $log"
    record "$name" FAIL "$dt"
  fi
  return "$rc"
}

# --- environment -------------------------------------------------------------------------------
{
  date
  uname -a
  command -v nvidia-smi > /dev/null && nvidia-smi
  command -v nvcc > /dev/null && nvcc --version
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> "$OUT/arch.log")
if [ -z "$ARCH" ]; then
  echo "== no usable CUDA GPU (see $OUT/arch.log): the CUDA tests will skip; building for the default archs"
  cat "$OUT/arch.log"
  record gpu FAIL 0  # this script exists to run the CUDA kernels: without a GPU it checked nothing
  ARCH_ENV=()
else
  echo "== local GPU: compute capability $ARCH"
  record gpu "ok:sm_${ARCH/./}" 0
  ARCH_ENV=(TORCH_CUDA_ARCH_LIST="$ARCH")
fi

# --- build -------------------------------------------------------------------------------------
run_step build 300 "$OUT/build.log" env ${ARCH_ENV[@]+"${ARCH_ENV[@]}"} AIAYN_CUDA=1 MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace
BUILD_OK=$?

if [ $BUILD_OK -eq 0 ]; then
  run_step build_info 60 "$OUT/build_info.json" "$PY" -c \
    "import json, aiayn; print(json.dumps(aiayn.build_info(), indent=2))"

  # --- the whole test suite ---------------------------------------------------------------------
  run_step pytest 300 "$OUT/pytest.log" "$PY" -m pytest -q -rs tests --junitxml="$OUT/pytest.xml" -p no:cacheprovider

  # --- compute-sanitizer on a small CUDA subset ---------------------------------------------------
  SANITIZER=$(command -v compute-sanitizer || true)
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
  done
  SUBSET="sanitizer_smoke or dropout_mask_matches_cpu or (parity_2x_rule and (fp16-7-3 or fp32-64-3 or bf16-1000-3))"
  if [ -n "$SANITIZER" ]; then
    # No caching allocator: every tensor is its own allocation, so an overrun hits unowned memory.
    for tool in memcheck racecheck synccheck; do
      run_step "sanitizer_$tool" 120 "$OUT/sanitizer_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 99 --target-processes all \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_add_dropout_layer_norm.py \
        tests/test_cuda_feed_forward.py tests/test_cuda_attention.py -k "$SUBSET"
    done
  else
    echo "== compute-sanitizer not found: skipped"
    record sanitizer skipped 0
  fi

  # --- benchmark -----------------------------------------------------------------------------------
  if [ -d aiayn/bench ] || [ -f aiayn/bench.py ]; then
    run_step bench_cuda 120 "$OUT/bench_cuda.log" "$PY" -m aiayn.bench --device cuda --quick --json "$OUT/bench_cuda.json"
  else
    echo "== aiayn/bench not found: benchmark skipped"
    record bench_cuda skipped 0
  fi
else
  record build_info skipped 0
  record pytest skipped 0
fi

# --- summary -------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
{
  echo
  echo "aiayn CUDA check: logs in $OUT"
  printf '%-20s %-8s %8s\n' step status seconds
  for i in "${!STEPS[@]}"; do
    printf '%-20s %-8s %8s\n' "${STEPS[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}"
  done
  printf '%-20s %-8s %8s\n' total "$([ $FAILED -eq 0 ] && echo ok || echo FAIL)" "$TOTAL"
} | tee "$OUT/summary.txt"
exit $FAILED
