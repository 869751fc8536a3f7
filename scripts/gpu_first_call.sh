#!/usr/bin/env bash
# The first command a session runs when it is lent a GPU machine (an H200: torch 2.11 + CUDA 13, triton 3.6,
# nvcc, no network; the device tool stops a command at 600 s and returns at most 8 files from $OUT).
#
#   bash scripts/gpu_first_call.sh                 the first call: every step below, within FIRST_CALL_BUDGET
#   bash scripts/gpu_first_call.sh rerun [LOG|DIR...]
#                                                  rerun only the tests that FAILED (or ERRORed) in those logs
#                                                  (default: the *.log files in .first_call/, else in $OUT)
#
# Every result is written to $OUT as it is produced, never only at exit: pytest runs with -v (one line per
# test, flushed: PYTHONUNBUFFERED=1) tee'd into its log, the probe flushes one CSV row per measurement, and
# summary.txt gets one line per step (rc, seconds) as each step ends. A timeout therefore loses at most
# the test or measurement in flight.
#
# Steps of the first call, in order (each one checks the budget first and runs under `timeout`):
#   env     nvidia-smi, kernel, CPUs, python/torch/CUDA/cuDNN/triton/nvcc/ncu/pytest versions, commit
#                                                                              -> env.txt
#   build   the C++/CUDA extension, sm_90 only, started in the BACKGROUND so that it overlaps the next
#           steps: FUSED_POSENC_CUDA_ARCHS=90 MAX_JOBS=16 pip install --no-deps --no-build-isolation -e .
#           run in a copy of the build inputs (setup.py, pyproject.toml, csrc/, fused_posenc/) under a
#           scratch folder; when it has finished, its fused_posenc/_C*.so is moved into this checkout in one
#           rename. So the checkout never holds a half-written extension, and the Triton steps (which do not
#           need it) import the package from the checkout (PYTHONPATH=.) while the build runs. Skipped, with
#           a line saying why, when there is no CUDA device, no CUDA torch or no nvcc   -> build.log
#   smoke   bf16 correctness of every encoding (none rope hope fope alibi tapa), forward and backward, on
#           backend="triton" against the float64 reference (tests/helpers.py's FlashAttention idiom):
#           tests/test_gpu_scripts.py -k smoke, small shapes, <= 180 s with its compiles  -> smoke.log
#   probe   scripts/gpu_probe.py (its docstring lists the sections): first-call compile time per encoding
#           (a fresh TRITON_CACHE_DIR, so cold), ms and TFLOP/s of ours vs SDPA flash/cuDNN and
#           rotate+SDPA at d128 bf16 causal 4096 (batch 2, 16 heads), host us per call, syncs per call, the
#           backward config A/B (first config vs autotuned)              -> probe.csv (rows), probe.log
#   native  waits for the build (never past the budget), then pytest tests/test_native_cuda.py -x -v
#                                                                              -> native.log
#   tests   while time is left: the Triton tests (-k "triton and not aot", core files first), pytest-xdist
#           -n $FIRST_CALL_WORKERS (default 4) when importable, pytest-timeout per test when importable
#                                                                              -> tests.log
# These are the 8 files of $OUT; no step writes anything else there (scratch goes to a mktemp folder).
#
# Env: FIRST_CALL_BUDGET (s, default 540: the tool stops a command at 600 s, and the machine start comes
#      out of the session's 15 device-minutes too), FIRST_CALL_WORKERS (xdist workers, default 4),
#      FIRST_CALL_TEST_TIMEOUT (s per test under pytest-timeout, default 300), FIRST_CALL_SKIP_BUILD=1,
#      FIRST_CALL_BUILD_TIMEOUT (s, default 420; never past the budget),
#      FIRST_CALL_FORCE_BUILD=1 (build even without a CUDA device: tests the build's plumbing on a CPU machine,
#      where setup.py then builds the CPU-only extension; use a scratch copy of the repo and a throwaway
#      environment, since pip -e registers the build copy there),
#      MAX_JOBS (default 16), FUSED_POSENC_AUTOTUNE (default 0 here: the first config of each pruned space,
#      as the test suites use; the probe's A/B section sets it itself), PYTHON (default python3),
#      PROBE_ARGS (extra scripts/gpu_probe.py arguments, e.g. "--seqlens 4096,8192 --ab-encodings rope,none").
# Exit status: 0 only if at least one step ran and every step that ran passed; a step not started because
# the budget was spent is listed in summary.txt and does not fail the run by itself.
#
# Rerun: $OUT is emptied before every command, so copy the logs that came back into .first_call/ (ignored
# by git) and carry it: `mkdir -p .first_call && cp <files_at>/*.log .first_call/`, then
# run(command="bash scripts/gpu_first_call.sh rerun", carry=[".first_call"]). It reads the FAILED/ERROR
# lines (pytest's -rfEs summary and -v lines, with or without xdist; pytest --lf cannot work under
# -p no:cacheprovider), reruns the non-native ones (-> rerun.log) and, if tests/test_native_cuda.py had
# failures, builds the extension in the background meanwhile and reruns those (-> rerun_native.log).
#
# Wheels: pytest, pytest-xdist, execnet and pytest-timeout are in the H200 image (KINDS.md's package list).
# A pure-Python package missing there, or another version of one, travels in .whl/ (ignored by git): here,
# in the repo root, `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION`
# for it and for each missing Requires-Dist (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`),
# one version of each; then run(..., carry=[".whl"]). This script installs whatever is in .whl/ with
# pip --no-index --no-deps --target into its scratch folder and puts that on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
MODE=first
if [ "${1:-}" = rerun ]; then MODE=rerun; shift; elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_first_call.sh [rerun [LOG|DIR...]]" >&2; exit 2
fi

OUT=${OUT:-/tmp/fused_posenc_first_call_out}
mkdir -p "$OUT" || exit 1
BUDGET=${FIRST_CALL_BUDGET:-540}
RESERVE=5  # seconds kept for the last lines and for `timeout -k` grace
T0=$(date +%s)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fused_posenc_first_call.XXXXXX") || exit 1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FUSED_POSENC_AUTOTUNE=${FUSED_POSENC_AUTOTUNE:-0}
export TRITON_CACHE_DIR="$WORK/triton-tests"  # smoke, native and tests share it; the probe gets a fresh one
WORKERS=${FIRST_CALL_WORKERS:-4}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

RC=0; RAN=0; NOT_STARTED=""; FAILED_STEPS=""
BUILD_STATE=none  # none | skipped | running | done
BUILD_T0=0

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) - RESERVE )); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; echo "$l"; }  # a step's timeout: min(own limit, left)
say() { printf '%s\n' "$*" >> "$SUMMARY"; printf 'first_call: %s\n' "$*"; }
# can_start NAME MIN: true if at least MIN seconds of the budget are left, else a "not started" line
can_start() {
  local l; l=$(left)
  [ "$l" -ge "$2" ] && return 0
  say "$(printf '%-7s not started: %ss of the %ss budget left, it needs %ss' "$1" "$l" "$BUDGET" "$2")"
  NOT_STARTED="$NOT_STARTED $1"
  return 1
}
# end_step NAME RC START NOTE...: the step's summary line, flushed now
end_step() {
  local name=$1 r=$2 start=$3; shift 3
  RAN=$((RAN + 1))
  [ "$r" -ne 0 ] && { RC=1; FAILED_STEPS="$FAILED_STEPS $name"; }
  say "$(printf '%-7s rc=%-3s %4ss  %s' "$name" "$r" "$(( $(date +%s) - start ))" "$*")"
}

XDIST=(); PT_TIMEOUT=()
pytest_plugins() {  # after the wheels are on PYTHONPATH
  "$PY" -c "import xdist" 2> /dev/null && XDIST=(-n "$WORKERS")
  "$PY" -c "import pytest_timeout" 2> /dev/null && PT_TIMEOUT=(--timeout "${FIRST_CALL_TEST_TIMEOUT:-300}")
}

# run_pytest LOG TIMEOUT XDIST-WORKERS ARGS...: pytest -v tee'd into LOG as it runs (its FAILED/ERROR lines
# also go to stdout, the first 40 of them); sets PYTEST_RC and PYTEST_LAST (pytest's final "N passed" line).
# awk reads to the end (no `head`: a closed pipe would kill tee, then pytest).
run_pytest() {
  local log=$1 t=$2 n=$3; shift 3
  local xd=()
  [ "${#XDIST[@]}" -gt 0 ] && [ "$n" -gt 1 ] && xd=(-n "$n")
  echo "+ timeout $t $PY -m pytest -v -p no:cacheprovider -rfEs ${xd[*]} ${PT_TIMEOUT[*]} $*" >> "$log"
  timeout -k 5 "$t" "$PY" -m pytest -v -p no:cacheprovider -rfEs "${xd[@]}" "${PT_TIMEOUT[@]}" "$@" 2>&1 \
    | tee -a "$log" | awk '/(^|\] )(FAILED|ERROR) |^tests\/.* (FAILED|ERROR)/ && n++ < 40 { print; fflush() }' 
  local r=${PIPESTATUS[0]}
  PYTEST_RC=$r
  PYTEST_LAST=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  if [ -z "$PYTEST_LAST" ]; then  # stopped before its summary: count the -v lines written so far
    local inflight
    inflight=$(tail -1 "$log" | grep -oE '^tests/[^ ]+ *$')
    local passed failed
    passed=$(grep -cE ' PASSED' "$log"); failed=$(grep -cE ' (FAILED|ERROR)' "$log")
    PYTEST_LAST="stopped (rc=$r) after ${t}s: $passed passed, $failed failed so far${inflight:+, in flight: $inflight}"
    printf '\npytest %s\n' "$PYTEST_LAST" >> "$log"
  fi
}

no_cuda_step() {  # NAME LOG: fail fast where a CUDA device is needed
  local start; start=$(date +%s)
  echo "$1: no CUDA device (torch.cuda.is_available() is False here): not run" | tee -a "$2"
  end_step "$1" 1 "$start" "no CUDA device"
}

# --- the background build --------------------------------------------------------------------------------
build_skip_reason() {
  [ "${FIRST_CALL_SKIP_BUILD:-0}" = 1 ] && { echo "FIRST_CALL_SKIP_BUILD=1"; return; }
  [ "${FIRST_CALL_FORCE_BUILD:-0}" = 1 ] && return  # the plumbing test: without CUDA, the CPU-only extension
  [ "$HAS_CUDA" = 1 ] || { echo "no CUDA device (torch.cuda.is_available() is False)"; return; }
  [ "$TORCH_CUDA" != None ] && [ -n "$TORCH_CUDA" ] || { echo "torch has no CUDA (torch.version.cuda is None)"; return; }
  command -v nvcc > /dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || { echo "no nvcc"; return; }
}

start_build() {  # LOG
  local log=$1 why t
  why=$(build_skip_reason)
  if [ -n "$why" ]; then
    echo "build skipped: $why; the C++/CUDA extension is not built" > "$log"
    say "$(printf '%-7s skipped: %s' build "$why")"
    BUILD_STATE=skipped; BUILD_WHY=$why
    return
  fi
  t=$(cap "${FIRST_CALL_BUILD_TIMEOUT:-420}")
  mkdir -p "$WORK/src" && cp -r setup.py pyproject.toml csrc fused_posenc "$WORK/src/" \
    && find "$WORK/src" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} + || {
    echo "build: could not copy the build inputs to $WORK/src" > "$log"; BUILD_STATE=skipped; BUILD_WHY="copy failed"
    say "$(printf '%-7s skipped: could not copy the build inputs' build)"; return; }
  echo "+ (cd $WORK/src && FUSED_POSENC_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} timeout $t" \
    "pip install -v --no-deps --no-build-isolation -e .)" > "$log"
  (
    cd "$WORK/src" || exit 1
    PYTHONPATH=${WHEEL_SITE:-} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
      FUSED_POSENC_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
      timeout -k 10 "$t" "$PY" -m pip install -v --no-deps --no-build-isolation -e . >> "$log" 2>&1 &
    echo $! > "$WORK/build.pid"
    wait $!
    r=$?
    echo "build finished rc=$r at $(date +%T)" >> "$log"
    echo "$r" > "$WORK/build.rc.tmp" && mv "$WORK/build.rc.tmp" "$WORK/build.rc"
  ) &
  BUILD_STATE=running; BUILD_T0=$(date +%s)
  for _ in $(seq 50); do [ -s "$WORK/build.pid" ] && break; sleep 0.1; done
  export FIRST_CALL_BUILD_PID; FIRST_CALL_BUILD_PID=$(cat "$WORK/build.pid" 2> /dev/null)
  say "$(printf '%-7s started in the background: sm_90, MAX_JOBS=%s, timeout %ss' build "${MAX_JOBS:-16}" "$t")"
}

stop_build() {  # WHY: end the build's process group (timeout forwards the signal to all of it)
  [ "$BUILD_STATE" = running ] || return 0
  [ -f "$WORK/build.rc" ] && return 0
  [ -n "${FIRST_CALL_BUILD_PID:-}" ] && kill -TERM "$FIRST_CALL_BUILD_PID" 2> /dev/null
  for _ in $(seq 40); do [ -f "$WORK/build.rc" ] && break; sleep 0.25; done
  echo "build stopped: $1" >> "$OUT/build.log"
}

# wait_build KEEP: wait until the build ends, or stop it when only KEEP seconds of the budget are left.
# Sets BUILD_RC and writes the build's summary line once.
wait_build() {
  [ "$BUILD_STATE" = running ] || return 0
  while [ ! -f "$WORK/build.rc" ]; do
    if [ "$(left)" -le "$1" ]; then stop_build "the budget left only $1 s"; break; fi
    sleep 2
  done
  BUILD_RC=$(cat "$WORK/build.rc" 2> /dev/null || echo 124)
  BUILD_STATE=done
  local note="sm_90 build"
  if [ "$BUILD_RC" -eq 0 ]; then
    local so
    so=$(ls "$WORK"/src/fused_posenc/_C*.so 2> /dev/null | head -1)
    [ -z "$so" ] && so=$(find "$WORK/src" -path '*fused_posenc/_C*.so' 2> /dev/null | head -1)
    if [ -n "$so" ] && cp "$so" "fused_posenc/.$(basename "$so").tmp.$$" \
        && mv -f "fused_posenc/.$(basename "$so").tmp.$$" "fused_posenc/$(basename "$so")"; then
      note="installed fused_posenc/$(basename "$so")"
    else
      BUILD_RC=1; note="pip succeeded but no fused_posenc/_C*.so was found under $WORK/src"
    fi
  elif [ "$BUILD_RC" -eq 124 ] || [ "$BUILD_RC" -eq 137 ] || [ "$BUILD_RC" -eq 143 ]; then
    note="stopped by its timeout or the budget after $(( $(date +%s) - BUILD_T0 ))s (build.log has its progress)"
  else
    note="failed; build.log: $(grep -E -m1 'error|Error' "$OUT/build.log" | tr -s ' ' | cut -c1-160)"
  fi
  end_step build "$BUILD_RC" "$BUILD_T0" "$note"
}

cleanup() {
  stop_build "the script ended"
  [ "$BUILD_STATE" = running ] && wait_build 999999 > /dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# --- env -----------------------------------------------------------------------------------------------
step_env() {
  local start; start=$(date +%s)
  local env=$OUT/env.txt
  WHEEL_SITE=""
  {
    echo "date $(date -u +%FT%TZ)  mode $MODE  budget ${BUDGET}s  out $OUT"
    echo "commit $(git rev-parse HEAD 2> /dev/null || echo unknown)" \
      " changed files: $(git status --porcelain 2> /dev/null | wc -l)"
    echo "kernel $(uname -srm)  cpus $(nproc)"
    if ls .whl/*.whl > /dev/null 2>&1; then
      if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target "$WORK/site" .whl/*.whl; then
        WHEEL_SITE=$WORK/site
        echo "wheels installed from .whl/: $(cd .whl && ls *.whl | tr '\n' ' ')"
      else
        echo "wheels in .whl/ failed to install (see above)"
      fi
    fi
  } > "$env" 2>&1
  [ -n "$WHEEL_SITE" ] && export PYTHONPATH="$PYTHONPATH:$WHEEL_SITE"
  {
    if command -v nvidia-smi > /dev/null 2>&1; then
      timeout 30 nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,\
clocks.max.sm,temperature.gpu,power.draw,persistence_mode
      timeout 30 nvidia-smi | head -25
    else
      echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi
    echo "nvcc: $(timeout 30 nvcc --version 2> /dev/null | tail -1 || echo not found)"
    echo "ncu: $(timeout 30 ncu --version 2> /dev/null | tail -1 || echo not found)"
    timeout 90 "$PY" - << 'EOF'
import importlib.metadata as md
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
    print("cuda_available", int(torch.cuda.is_available()))
    print("torch_cuda", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
              "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
except Exception as e:
    print("torch not importable:", type(e).__name__, e)
    print("cuda_available 0")
for name in ["triton", "pytest", "pytest-xdist", "execnet", "pytest-timeout", "numpy", "setuptools", "ninja"]:
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
try:
    import fused_posenc
    print("fused_posenc from", fused_posenc.__file__)
except Exception as e:
    print("fused_posenc not importable:", type(e).__name__, e)
EOF
  } >> "$env" 2>&1
  local r=$?
  HAS_CUDA=$(awk '/^cuda_available /{print $2; exit}' "$env"); HAS_CUDA=${HAS_CUDA:-0}
  TORCH_CUDA=$(awk '/^torch_cuda /{print $2; exit}' "$env")
  pytest_plugins
  echo "pytest plugins: xdist ${XDIST[*]:-(not importable)}  timeout ${PT_TIMEOUT[*]:-(not importable)}" >> "$env"
  local dev; dev=$(awk '/^device /{sub(/^device /, ""); print; exit}' "$env")
  end_step env "$r" "$start" "$(grep -m1 '^torch ' "$env" | cut -c1-80); ${dev:-no CUDA device}"
}

# --- first-call steps ------------------------------------------------------------------------------------
step_smoke() {
  local log=$OUT/smoke.log start; start=$(date +%s)
  : > "$log"
  if [ "$HAS_CUDA" != 1 ]; then no_cuda_step smoke "$log"; return; fi
  run_pytest "$log" "$(cap 180)" 6 tests/test_gpu_scripts.py -k smoke
  local r=$PYTEST_RC
  if [ "$r" -eq 0 ] && ! grep -q ' PASSED' "$log"; then r=1; PYTEST_LAST="no smoke test PASSED: $PYTEST_LAST"; fi
  end_step smoke "$r" "$start" "$PYTEST_LAST"
}

step_probe() {
  local log=$OUT/probe.log start t; start=$(date +%s)
  t=$(cap 240)
  # a fresh Triton cache: the first-call rows are cold compiles; --budget ends the probe before the timeout
  # shellcheck disable=SC2086
  TRITON_CACHE_DIR=$WORK/triton-probe timeout -k 5 "$t" "$PY" scripts/gpu_probe.py --csv "$OUT/probe.csv" \
    --budget $((t - 10)) ${PROBE_ARGS:-} > "$log" 2>&1
  local r=$?
  [ "$r" -eq 124 ] || [ "$r" -eq 137 ] && echo "probe stopped by timeout after ${t}s (rc=$r)" >> "$log"
  grep -E '^(speed|sdpa|bwd_ab|first_call) ' "$log" | cut -c1-150 | head -40
  end_step probe "$r" "$start" "$(tail -1 "$log" | tr -s ' ' | cut -c1-160)"
}

step_native() {
  local log=$OUT/native.log start; start=$(date +%s)
  : > "$log"
  if [ "$HAS_CUDA" != 1 ]; then no_cuda_step native "$log"; wait_build 0; return; fi
  if [ "$BUILD_STATE" = skipped ]; then
    echo "native: the extension was not built ($BUILD_WHY)" | tee -a "$log"
    end_step native 1 "$start" "extension not built: $BUILD_WHY"; return
  fi
  wait_build 45
  if [ "${BUILD_RC:-1}" -ne 0 ]; then
    { echo "native: the extension build failed (rc=$BUILD_RC); its log's last lines:"; tail -30 "$OUT/build.log"; } >> "$log"
    end_step native 1 "$start" "extension build failed (rc=$BUILD_RC)"; return
  fi
  timeout 60 "$PY" -c "import fused_posenc._C as c; print('extension', c.__file__, 'has_cuda', c.has_cuda())" \
    >> "$log" 2>&1
  grep -m1 '^extension ' "$log" >> "$OUT/env.txt"
  if ! can_start native-tests 20; then end_step native 1 "$start" "no time left for its tests"; return; fi
  run_pytest "$log" "$(cap 120)" 1 tests/test_native_cuda.py -x
  end_step native "$PYTEST_RC" "$start" "$PYTEST_LAST"
}

step_tests() {
  local log=$OUT/tests.log start; start=$(date +%s)
  : > "$log"
  if [ "$HAS_CUDA" != 1 ]; then no_cuda_step tests "$log"; return; fi
  local core=(tests/test_triton_encodings.py tests/test_triton_shapes.py tests/test_triton_positions.py
              tests/test_triton_rope_variants.py tests/test_triton_tuning.py)
  # files one by one, core first (given with the tests folder, pytest would collect them in folder order);
  # test_gpu_scripts.py holds the smoke, which ran already
  local files=() f
  for f in "${core[@]}" tests/test_*.py; do
    [ -f "$f" ] && [ "$f" != tests/test_gpu_scripts.py ] && [[ " ${files[*]} " != *" $f "* ]] && files+=("$f")
  done
  run_pytest "$log" "$(cap 600)" "$WORKERS" "${files[@]}" -k "triton and not aot"
  end_step tests "$PYTEST_RC" "$start" "$PYTEST_LAST"
}

# --- rerun ---------------------------------------------------------------------------------------------
failed_ids() {  # LOG...: the node ids of FAILED/ERROR lines, first seen first
  grep -hE '(^|\] )(FAILED|ERROR) tests/|^tests/[^ ]+ (FAILED|ERROR)' "$@" 2> /dev/null \
    | grep -oE 'tests/[^ ]+' | awk '!seen[$0]++'
}

step_rerun() {
  local srcs=("$@") logs=() s
  [ ${#srcs[@]} -eq 0 ] && { if [ -d .first_call ]; then srcs=(.first_call); else srcs=("$OUT"); fi; }
  for s in "${srcs[@]}"; do
    if [ -d "$s" ]; then for f in "$s"/*.log; do [ -f "$f" ] && logs+=("$f"); done; elif [ -f "$s" ]; then logs+=("$s"); fi
  done
  local log=$OUT/rerun.log start; start=$(date +%s)
  : > "$log"
  if [ ${#logs[@]} -eq 0 ]; then
    echo "rerun: no logs found in ${srcs[*]}" | tee -a "$log"; end_step rerun 1 "$start" "no logs in ${srcs[*]}"; return
  fi
  mapfile -t ids < <(failed_ids "${logs[@]}")
  local native=() other=() id
  for id in "${ids[@]}"; do
    case $id in tests/test_native_cuda.py*) native+=("$id") ;; *) other+=("$id") ;; esac
  done
  { echo "rerun: ${#ids[@]} failed test(s) in ${logs[*]}"; printf '  %s\n' "${ids[@]}"; } >> "$log"
  say "$(printf '%-7s %s failed test(s) found in %s (%s native)' parse "${#ids[@]}" "${logs[*]}" "${#native[@]}")"
  if [ ${#ids[@]} -eq 0 ]; then RAN=$((RAN + 1)); say "nothing to rerun"; return; fi
  if [ "$HAS_CUDA" != 1 ]; then no_cuda_step rerun "$log"; return; fi
  [ ${#native[@]} -gt 0 ] && start_build "$OUT/build.log"
  if [ ${#other[@]} -gt 0 ] && can_start rerun 30; then
    local n=$WORKERS; [ ${#other[@]} -lt "$n" ] && n=${#other[@]}
    run_pytest "$log" "$(cap 600)" "$n" "${other[@]}"
    end_step rerun "$PYTEST_RC" "$start" "${#other[@]} test(s): $PYTEST_LAST"
  fi
  if [ ${#native[@]} -gt 0 ]; then
    local nlog=$OUT/rerun_native.log nstart; nstart=$(date +%s)
    : > "$nlog"
    if [ "$BUILD_STATE" = skipped ]; then end_step rerun-native 1 "$nstart" "extension not built: $BUILD_WHY"; return; fi
    wait_build 30
    if [ "${BUILD_RC:-1}" -ne 0 ]; then end_step rerun-native 1 "$nstart" "extension build failed"; return; fi
    can_start rerun-native 20 || return
    run_pytest "$nlog" "$(cap 300)" 1 "${native[@]}"
    end_step rerun-native "$PYTEST_RC" "$nstart" "${#native[@]} test(s): $PYTEST_LAST"
  fi
}

# --- main ----------------------------------------------------------------------------------------------
HAS_CUDA=0; TORCH_CUDA=""; BUILD_WHY=""; WHEEL_SITE=""
if can_start env 5; then step_env; fi
if [ "$MODE" = rerun ]; then
  step_rerun "$@"
else
  : > "$OUT/build.log"
  if can_start build 60; then start_build "$OUT/build.log"; else echo "build not started: budget" > "$OUT/build.log"; fi
  if can_start smoke 30; then step_smoke; fi
  if can_start probe 30; then step_probe; fi
  if can_start native 30; then step_native; fi
  if can_start tests 30; then step_tests; fi
fi
stop_build "no step needs it any more"  # only if it is still running
wait_build 0
[ "$RAN" -eq 0 ] && RC=1
say "$(printf '%-7s rc=%-3s %4ss of the %ss budget; failed:%s; not started:%s' total "$RC" "$(elapsed)" "$BUDGET" \
  "${FAILED_STEPS:- none}" "${NOT_STARTED:- none}")"
nfiles=$(find "$OUT" -type f | wc -l)
[ "$nfiles" -gt 8 ] && echo "first_call: WARNING: $nfiles files under $OUT; the device tool returns at most 8"
echo "---- $SUMMARY"
cat "$SUMMARY"
exit "$RC"
