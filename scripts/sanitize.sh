#!/usr/bin/env bash
# Memory safety check of the C++ extension: build fused_posenc._C with AddressSanitizer + UndefinedBehaviorSanitizer
# in a scratch copy of this checkout (the checkout and its installed build are not touched), then run the tests
# that exercise the `cpu` backend and _C, and a seeded random fuzz against the float64 reference
# (scripts/fuzz_native.py, bad inputs to the private bindings included). Any sanitizer report or test failure fails
# the run (exit 1; 2 when the check itself cannot run); the last line is one summary:
#   sanitize: 0 findings (N tests, M fuzz cases, build Xs, run Ys)
#
# Needs: what the tests need (torch, pytest, numpy), g++ with libasan and libubsan, ninja.
# Environment (all optional):
#   SANITIZE_PYTHON=python        interpreter whose torch builds and runs the extension (default: python on PATH)
#   SANITIZE_WORKDIR=DIR          build there and keep it (default: a fresh temporary dir, removed after a clean run);
#                                 a kept DIR recompiles only the sources that changed
#   SANITIZE_KEEP=1               keep the temporary dir (logs, build) after a clean run too
#   SANITIZE_SEED=0               fuzz seed (a run is reproducible for a seed)
#   SANITIZE_FUZZ_ITERS=200       random fuzz cases (and half as many again at 16-byte vectors, plus 20 cases at
#                                 extreme positions and the bad-binding cases) ...
#   SANITIZE_FUZZ_BUDGET=150      ... but at most this many seconds of random cases in all (2/3 for the first run)
#   SANITIZE_CLONES=0             1: compile the kernels' three target_clones ISA copies as shipped. Default 0: one
#                                 copy for this machine's ISA (-DFUSED_POSENC_NO_CLONES -march=native), which is the
#                                 copy that would run here anyway, so the same code is checked; it compiles in about
#                                 half the time. (A NO_CLONES build without -march=native would check only the SSE one.)
#   SANITIZE_DEBUG=-g1            debug info: line tables are all a report's stack needs (-g: full, ~40% slower build)
#   SANITIZE_TESTS="..."          test files (relative to tests/) instead of the default list below
#   SANITIZE_DESELECT="..."       pytest -k expression (default: leaves out Triton/CUDA and pure-reference tests)
#   SANITIZE_PYTEST_ARGS="..."    extra pytest arguments
#   MAX_JOBS=N                    parallel compile jobs (default: CPU count)
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${SANITIZE_PYTHON:-python}"
SEED="${SANITIZE_SEED:-0}"
FUZZ_ITERS="${SANITIZE_FUZZ_ITERS:-200}"
FUZZ_BUDGET="${SANITIZE_FUZZ_BUDGET:-150}"
CLONES="${SANITIZE_CLONES:-0}"
DEBUG="${SANITIZE_DEBUG:--g1}"
DEFAULT_TESTS="test_native_cpu.py test_native_cpu_vector_widths.py test_regressions.py test_errors.py
  test_double_backward.py test_exact_positions.py test_no_silent_wrong_answers.py test_alibi_far_keys.py"
TESTS="${SANITIZE_TESTS:-$DEFAULT_TESTS}"
# tests that never reach native code: the Triton and CUDA backends, the reference's own double backward
DESELECT="${SANITIZE_DESELECT:-not triton and not cuda and not finite_differences}"
BAD_CATEGORIES="lse slopes dout out dtypes strides positions encoding scoreopts"

die() { echo "sanitize: ERROR: $*" >&2; KEEP=1; exit 2; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }

if [ -n "${SANITIZE_WORKDIR:-}" ]; then
  WORK="$(mkdir -p "$SANITIZE_WORKDIR" && cd "$SANITIZE_WORKDIR" && pwd)" || die "cannot create $SANITIZE_WORKDIR"
  KEEP=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/fused_posenc_sanitize.XXXXXX")" || die "mktemp failed"
  KEEP="${SANITIZE_KEEP:-0}"
fi
cleanup() { if [ "$KEEP" = 1 ]; then echo "sanitize: work dir kept: $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
SRC="$WORK/src" LOGS="$WORK/logs" TOOLS="$WORK/tools"
rm -rf "$LOGS" "$WORK/selftest" && mkdir -p "$SRC" "$LOGS" "$TOOLS" "$WORK/selftest" || die "cannot create $WORK"

# ---- the toolchain --------------------------------------------------------------------------------------------
REAL_CXX="$(command -v "${CXX:-g++}")" || die "compiler ${CXX:-g++} not found"
LIBASAN="$("$REAL_CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$REAL_CXX" -print-file-name=libubsan.so)"
LIBSTDCXX="$("$REAL_CXX" -print-file-name=libstdc++.so.6)"
for lib in "$LIBASAN" "$LIBUBSAN" "$LIBSTDCXX"; do
  [ -f "$lib" ] || die "$lib not found ($REAL_CXX -print-file-name); install the compiler's libasan / libubsan"
done
"$PY" -c "import torch, pytest" 2>/dev/null || die "$PY cannot import torch and pytest"

# ---- a copy of the checkout: tracked files and untracked ones git does not ignore (the working tree as it is) ---
cd "$ROOT" || die "cannot cd $ROOT"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # a kept DIR: its build/ only (incremental)
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
  if [ -f "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
done | xargs -0 cp -P -p --parents -t "$SRC" || die "copying the checkout to $SRC failed"
rm -f "$SRC"/fused_posenc/_C*.so

# ---- the sanitized build ---------------------------------------------------------------------------------------
# setup.py compiles with -O3 after CFLAGS (torch's ninja rule: $cflags ... $post_cflags), so -O1 is appended by a
# compiler wrapper (CXX, which torch's build honours); setup.py itself is unchanged.
SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined $DEBUG -O1"
[ "$CLONES" = 1 ] || SAN_FLAGS="$SAN_FLAGS -DFUSED_POSENC_NO_CLONES -march=native"
cat > "$TOOLS/g++" <<EOF
#!/bin/sh
exec "$REAL_CXX" "\$@" -O1
EOF
chmod +x "$TOOLS/g++"
echo "sanitize: building the ASan+UBSan extension in $SRC ($SAN_FLAGS) ..."
t_build0="$(now)"
(
  cd "$SRC" &&
  env CXX="$TOOLS/g++" CFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined" FUSED_POSENC_SKIP_CUDA_BUILD=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
) > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log" >&2; die "the sanitized build failed ($LOGS/build.log)"; }
BUILD_S="$(secs "$t_build0" "$(now)")"
SO="$(ls "$SRC"/fused_posenc/_C*.so 2>/dev/null | head -1)"
[ -n "$SO" ] || die "the build produced no fused_posenc/_C*.so"
nm -D "$SO" | grep -q "__asan_report" || die "$SO is not instrumented by ASan"
nm -D "$SO" | grep -q "__ubsan_handle" || die "$SO is not instrumented by UBSan"
echo "sanitize: built $SO in ${BUILD_S}s"
# the self-test's library, instrumented as the extension is (built before LD_PRELOAD is set)
printf 'int fpe_canary_add(int a, int b) { return a + b; }\n' > "$TOOLS/canary.c"
"$REAL_CXX" -x c -fsanitize=address,undefined -fno-sanitize-recover=undefined -shared -fPIC \
  -o "$TOOLS/canary.so" "$TOOLS/canary.c" || die "cannot build the self-test library"

# ---- the sanitized runtime -------------------------------------------------------------------------------------
# Every report goes to a file, so none is lost in pytest's output capture or a test's subprocess: ASan's through
# log_path, UBSan's through __sanitizer_set_report_path called at interpreter start (sitecustomize below: in a process
# that preloads ASan, UBSan ignores UBSAN_OPTIONS' log_path and writes to stderr). Exit code 86 marks a sanitizer's
# exit. allow_user_segv_handler=0: a SEGV gets ASan's report, not Python's faulthandler's.
export LD_PRELOAD="$LIBASAN $LIBSTDCXX${LD_PRELOAD:+ $LD_PRELOAD}"
ASAN_BASE="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:allow_user_segv_handler=0"
ASAN_BASE="$ASAN_BASE${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=86${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export SANITIZE_LIBUBSAN="$LIBUBSAN" SANITIZE_SRC="$SRC"
log_to() {  # the reports of what runs next go to $1/asan.PID and $1/ubsan.PID
  export ASAN_OPTIONS="$ASAN_BASE:log_path=$1/asan" SANITIZE_UBSAN_LOG="$1/ubsan"
}
cat > "$TOOLS/sitecustomize.py" <<'EOF'
# scripts/sanitize.sh: UBSan's reports to a file (see there)
import ctypes
import os

if os.environ.get("SANITIZE_UBSAN_LOG"):
    ctypes.CDLL(os.environ["SANITIZE_LIBUBSAN"]).__sanitizer_set_report_path(os.environ["SANITIZE_UBSAN_LOG"].encode())
EOF
cat > "$TOOLS/sanitize_guard.py" <<'EOF'
# scripts/sanitize.sh: pytest must import the sanitized extension of the copy, not the checkout's (editable) one
import os


def pytest_configure(config):
    import fused_posenc._C as c

    f, src = os.path.realpath(c.__file__), os.path.realpath(os.environ["SANITIZE_SRC"])
    if not f.startswith(src + os.sep):
        raise RuntimeError(f"sanitize: pytest imported {f}, not the sanitized build under {src}")
EOF
export PYTHONPATH="$TOOLS:$SRC${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset FUSED_POSENC_BACKEND  # nothing may redirect "auto" elsewhere
cd "$SRC" || die "cannot cd $SRC"

count_reports() {  # sanitizer reports in the files under $1 (ASan: one ERROR line each; UBSan: one runtime error)
  cat "$1"/asan.* "$1"/ubsan.* 2>/dev/null | grep -cE "^==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: "
}

# Self-test: sanitizers that are not active (preload failed, reports lost) must not pass as "0 findings".
# A heap over-read through ASan's memcpy interceptor, and a signed overflow in a library built like the extension.
log_to "$WORK/selftest"
for kind in asan ubsan; do
  "$PY" - "$kind" "$TOOLS/canary.so" <<'EOF' >/dev/null 2>&1
import ctypes, sys
if sys.argv[1] == "asan":
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    ctypes.string_at(libc.malloc(8), 16)  # reads 8 bytes past the block
else:
    ctypes.CDLL(sys.argv[2]).fpe_canary_add(2**31 - 1, 1)
EOF
  rc=$?
  n="$(count_reports "$WORK/selftest")"
  rm -f "$WORK/selftest"/*
  [ "$rc" = 86 ] && [ "$n" = 1 ] ||
    die "sanitizer self-test '$kind' not caught (exit $rc, $n reports): the sanitizers are not active"
done
echo "sanitize: self-test ok (an ASan and a UBSan report each reach their log file and exit 86)"
log_to "$LOGS"

t_run0="$(now)"
FAILED=()
"$PY" - <<'EOF' > "$LOGS/import.out" 2> "$LOGS/import.log" ||
  { cat "$LOGS/import.out" "$LOGS/import.log" >&2; die "cannot import the sanitized extension"; }
import os
import fused_posenc._C as c
f, src = os.path.realpath(c.__file__), os.path.realpath(os.environ["SANITIZE_SRC"])
print(f"sanitize: fused_posenc._C = {f} (vector bytes {c.cpu_vector_bytes()})")
if not f.startswith(src + os.sep):
    raise SystemExit(f"sanitize: imported {f}, not the sanitized build under {src}")
print(c.cpu_vector_bytes())
EOF
head -1 "$LOGS/import.out"
VECTOR_BYTES="$(tail -1 "$LOGS/import.out")"

# 1. the tests of the cpu backend and _C (the guard plugin checks which extension pytest imports)
test_files=()
for t in $TESTS; do
  if [ -f "tests/$t" ]; then test_files+=("tests/$t"); else echo "sanitize: (no tests/$t, skipped)"; fi
done
[ "${#test_files[@]}" -gt 0 ] || die "no test files to run"
echo "sanitize: pytest ${test_files[*]}"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p sanitize_guard -p no:cacheprovider -k "$DESELECT" -rfEs \
  --junitxml="$LOGS/tests.xml" ${SANITIZE_PYTEST_ARGS:-} "${test_files[@]}" > "$LOGS/tests.log" 2>&1
rc=$?
tail -12 "$LOGS/tests.log"
[ "$rc" = 0 ] || FAILED+=("tests (exit $rc)")
NTESTS="$("$PY" - "$LOGS/tests.xml" <<'EOF' 2>/dev/null || echo "?"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(int(s.get("tests")) - int(s.get("skipped", 0)))
EOF
)"

# 2. the random fuzz against the reference: at this machine's vector width, then (a third of the budget) at the
# narrowest (16 bytes, SSE: FUSED_POSENC_CPU_VECTOR_BYTES, as tests/test_native_cpu_vector_widths.py does)
NFUZZ=0
fuzz() {  # fuzz LOGNAME ARGS...: run scripts/fuzz_native.py, show its failures and summary, count its cases
  local name="$1"
  shift
  "$PY" scripts/fuzz_native.py --seed "$SEED" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "^(FAIL|    [A-Za-z]*Error|    replay|fuzz_native: ([0-9]|time))" "$LOGS/$name.log" | head -20 | sed "s/^/  [$name] /"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
  local n b
  n="$(grep -oE '^fuzz_native: [0-9]+ random cases' "$LOGS/$name.log" | grep -oE '[0-9]+' || echo 0)"
  b="$(grep -oE '[0-9]+ bad-binding cases' "$LOGS/$name.log" | grep -oE '^[0-9]+' || echo 0)"
  NFUZZ=$((NFUZZ + n + b))
  return "$rc"
}
B1=$((FUZZ_BUDGET * 2 / 3))
echo "sanitize: fuzz_native.py --seed $SEED: $FUZZ_ITERS cases (at most ${B1}s) + $((FUZZ_ITERS / 2)) at 16-byte" \
  "vectors (at most $((FUZZ_BUDGET - B1))s)"
fuzz fuzz --iters "$FUZZ_ITERS" --time-budget "$B1" --extreme-positions 20
if [ "$VECTOR_BYTES" != 16 ]; then
  FUSED_POSENC_CPU_VECTOR_BYTES=16 fuzz fuzz-16 --iters "$((FUZZ_ITERS / 2))" --time-budget "$((FUZZ_BUDGET - B1))"
fi

# 3. bad inputs to the private bindings (each must raise); when that fails, once more one process per category, so
# that one out-of-bounds read (which ends its process) does not hide the others
echo "sanitize: fuzz_native.py --bad-bindings"
mkdir -p "$LOGS/bad-bindings-all"
log_to "$LOGS/bad-bindings-all"  # not counted: a failure reruns every category below
n0="$NFUZZ"
if ! fuzz bad-bindings --no-random --bad-bindings -v; then
  log_to "$LOGS"
  NFUZZ="$n0"
  for cat in $BAD_CATEGORIES; do
    fuzz "bad-$cat" --no-random --bad-bindings "$cat" -v
  done
fi
log_to "$LOGS"
RUN_S="$(secs "$t_run0" "$(now)")"

# ---- the verdict -----------------------------------------------------------------------------------------------
NFIND="$(count_reports "$LOGS")"
# a report that reached a plain log instead of its file (it should not) counts too
NSTRAY="$(cat "$LOGS"/*.log | grep -cE "^==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: ")"
NFIND=$((NFIND + NSTRAY))
if [ "$NFIND" -gt 0 ]; then
  KEEP=1
  echo "sanitize: ---- sanitizer reports (first lines; full reports in $LOGS) ----"
  for f in "$LOGS"/asan.* "$LOGS"/ubsan.*; do
    [ -f "$f" ] || continue
    echo "== $f"
    grep -E "ERROR: |runtime error:|^(READ|WRITE) of|^SUMMARY:|^    #[0-9] " "$f" | head -12
  done
  [ "$NSTRAY" = 0 ] ||
    grep -lE "^==[0-9]+==ERROR: [A-Za-z]+Sanitizer|: runtime error: " "$LOGS"/*.log | sed 's/^/== report in /'
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  KEEP=1
  echo "sanitize: failed: ${FAILED[*]} (logs in $LOGS)"
fi
echo "sanitize: $NFIND findings ($NTESTS tests, $NFUZZ fuzz cases, build ${BUILD_S}s, run ${RUN_S}s)"
[ "$NFIND" = 0 ] && [ "${#FAILED[@]}" = 0 ]
