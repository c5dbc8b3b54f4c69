#!/usr/bin/env bash
# The CPU op tests under AddressSanitizer + UndefinedBehaviorSanitizer:
#   scripts/sanitize_check.sh [WORKDIR]
# Copies the sources into WORKDIR (default build/sanitize, kept so a re-run rebuilds incrementally),
# builds aiayn._C there with AIAYN_SANITIZE=$SANITIZERS (AIAYN_CUDA=0), and runs the op tests
# against that copy inside a normal python with the sanitizer runtimes preloaded. Fails on any
# report (ASan and UBSan both stop the process at the first one; the log is grepped as well).
# Touches nothing outside WORKDIR: the checkout's own build and environment stay as they are.
#
# Env: PYTHON (default python), SANITIZERS (AIAYN_SANITIZE of the build, default
# address,undefined,float-cast-overflow), AIAYN_FUZZ_EXAMPLES (default 200 here: a fast subset of
# test_fuzz), SANITIZE_PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$ROOT/build/sanitize}
PY=${PYTHON:-python}
# ASan + UBSan; float-cast-overflow (not part of GCC's "undefined") catches float -> int conversions
# out of range, e.g. of a NaN.
SANITIZERS=${SANITIZERS:-address,undefined,float-cast-overflow}
CC_BIN=${CC:-gcc}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SRC=$WORK/src
start=$(date +%s)

# A copy of what the build and the tests need; cp -a keeps the mtimes so ninja rebuilds only what
# changed since the last run.
mkdir -p "$SRC"
for item in aiayn csrc tests; do
  rm -rf "${SRC:?}/$item"
  cp -a "$ROOT/$item" "$SRC/$item"
done
cp -a "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$SRC/"
find "$SRC/aiayn" -name '*.so' -delete
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +

echo "sanitize_check: building a sanitized aiayn._C in $SRC"
(cd "$SRC" && AIAYN_CUDA=0 AIAYN_SANITIZE="$SANITIZERS" MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1) || {
  tail -n 60 "$WORK/build.log"
  echo "sanitize_check: FAILED: the sanitized build failed (log: $WORK/build.log)" >&2
  exit 1
}
tail -n 1 "$WORK/build.log"
built=$(date +%s)

libasan=$("$CC_BIN" -print-file-name=libasan.so)
libubsan=$("$CC_BIN" -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
  [ -e "$lib" ] || { echo "sanitize_check: $lib not found (install the gcc sanitizer runtimes)" >&2; exit 1; }
done
so=$(ls "$SRC"/aiayn/_C*.so)
case "$(ldd "$so")" in *libasan*) ;; *) echo "sanitize_check: $so is not linked against libasan" >&2; exit 1 ;; esac

# detect_leaks=0: CPython leaks by design. ASan must come first in the process (LD_PRELOAD).
# Tests that need a compiler toolchain or subprocess builds (torch.compile) run too: they only call
# the ops through the dispatcher.
log=$WORK/pytest.log
set +e
(cd "$SRC" && env \
  LD_PRELOAD="$libasan:$libubsan${LD_PRELOAD:+:$LD_PRELOAD}" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86:strict_init_order=1:detect_stack_use_after_return=0:allocator_may_return_null=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87" \
  AIAYN_FUZZ_EXAMPLES="${AIAYN_FUZZ_EXAMPLES:-200}" \
  PYTHONDONTWRITEBYTECODE=1 \
  "$PY" -m pytest -q -p no:cacheprovider -x ${SANITIZE_PYTEST_ARGS:-} \
    tests/test_add_dropout_layer_norm.py tests/test_attention.py tests/test_philox.py \
    tests/test_linear.py tests/test_feed_forward.py tests/test_linear_cross_entropy.py tests/test_fuzz.py \
    tests/test_log_softmax_topk.py tests/test_linear_int8.py tests/test_decoder_step.py tests/test_bad_inputs.py \
    2>&1) | tee "$log"
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s)
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log"; then
  echo "sanitize_check: FAILED: sanitizer report in $log" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "sanitize_check: FAILED: pytest exited with $rc (86 = ASan, 87 = UBSan report; log: $log)" >&2
  exit 1
fi
echo "sanitize_check: clean (build $((built - start)) s, tests $((end - built)) s)"
