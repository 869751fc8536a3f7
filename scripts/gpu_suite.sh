#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, benchmark subset, demo; logs and CSVs under $OUT.
# A session's FIRST call on a GPU machine is scripts/gpu_first_call.sh (results within 15 device-minutes,
# each written as it is made); this suite is for later calls.
#
#   bash scripts/gpu_suite.sh [tests] [native] [probe] [bench] [demo]     (default: all of them)
#   bash scripts/gpu_suite.sh sequences      decode and varlen vs rotate+SDPA (benchmarks/bench_sequences.py)
#                                            -> $OUT/sequences_cuda.csv, $OUT/sequences_cuda.md
#
# Env: SKIP_EXT=1 (no C++/CUDA build), TEST_TIMEOUT (s, per pytest step), BENCH_BUDGET (s),
#      BENCH_ARGS (extra benchmarks/run.py args), PROBE_SEQLENS (e.g. 4096,1024: the first is the probe's main
#      shape, see scripts/gpu_probe.py),
#      SUITE_BUDGET (s, default 560: the device tool stops a command at 600 s). Every step's timeout is cut to
#      what is left of the budget; a step with less than 30 s left is not started and fails the run, so
#      split a long run into calls: `bash scripts/gpu_suite.sh tests`, then `native probe`, then `bench demo`.
# Exit status: nonzero if any step failed, timed out or was not started (install, tests, a CUDA extension
# built without CUDA, probe, bench, demo).
# What comes back (the device tool returns at most 8 files): $OUT/summary.txt (one line per step),
# $OUT/env.txt, $OUT/bench.csv, $OUT/bench.md, $OUT/probe.csv, and $OUT/logs.tgz with every log.
# Wheels of missing pure-Python packages (liger-kernel, pytest-xdist) may be carried in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/fused_posenc_out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-tests native probe bench demo}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
t0=$(date +%s)
left() {  # seconds a step may take: min(its own limit, what is left of SUITE_BUDGET)
  local l=$(( ${SUITE_BUDGET:-560} - ($(date +%s) - t0) ))
  [ "$1" -lt "$l" ] && l=$1
  echo "$l"
}
rc=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -n "${SKIP_EXT:-}" ] && export FUSED_POSENC_SKIP_EXT_BUILD=1
start=$(date +%s)
MAX_JOBS=16 FUSED_POSENC_CUDA_ARCHS=${FUSED_POSENC_CUDA_ARCHS:-90} \
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1
r=$?; rc=$((rc | r))
summary "install rc=$r ($(( $(date +%s) - start ))s)"
read -r HAS_CUDA VEC_BYTES <<< "$(python3 -c "import fused_posenc._C as c; print(c.has_cuda(), c.cpu_vector_bytes())" \
  2> /dev/null || echo "not-importable -")"
echo "extension has_cuda $HAS_CUDA cpu_vector_bytes $VEC_BYTES" >> "$OUT/env.txt"

# pytest-xdist when present (carried as a wheel or installed), else one process
XDIST=""
python3 -c "import xdist" 2> /dev/null && XDIST="-n 8"

run_pytest() {  # name, pytest args...
  local name=$1; shift
  # -v: one line per test as it ends, so a timeout keeps every result before it
  timeout "$(left "${TEST_TIMEOUT:-420}")" python3 -m pytest -v -rfEs -p no:cacheprovider $XDIST "$@" > "$LOGS/pytest_$name.log" 2>&1
  local r=$?
  rc=$((rc | r))
  summary "pytest $name rc=$r: $(tail -1 "$LOGS/pytest_$name.log")"
  grep -E "^(FAILED|ERROR)" "$LOGS/pytest_$name.log" | head -20
}

for s in $steps; do
  if [ "$(left 30)" -lt 30 ]; then summary "$s not started: SUITE_BUDGET spent"; rc=1; continue; fi
  case $s in
    # the AOT compile test is a CPU-only check (CI runs it); the GPU compiles the kernels for real
    tests)  FUSED_POSENC_AUTOTUNE=${FUSED_POSENC_AUTOTUNE:-0} run_pytest triton tests -k "triton and not aot" ;;
    native)
      if [ "$HAS_CUDA" != "True" ]; then
        summary "native: the extension has no CUDA kernels (has_cuda: $HAS_CUDA; see install.log)"; rc=1
      fi
      run_pytest native tests/test_native_cuda.py tests/test_native_cpu.py ;;
    probe)
      t=$(left "${PROBE_TIMEOUT:-200}")
      timeout "$t" python3 scripts/gpu_probe.py --seqlens "${PROBE_SEQLENS:-4096,1024}" --budget $((t - 10)) \
        --csv "$OUT/probe.csv" > "$LOGS/probe.log" 2>&1
      r=$?; rc=$((rc | r)); summary "probe rc=$r"; grep -v Warn "$LOGS/probe.log" | tail -40 ;;
    bench)
      b=$(left "${BENCH_BUDGET:-300}")
      timeout "$((b + 20))" python3 benchmarks/run.py --preset gpu-quick --time-budget "$b" ${BENCH_ARGS:-} \
        --out "$OUT/bench.csv" > "$LOGS/bench.log" 2>&1
      r=$?; rc=$((rc | r)); summary "bench rc=$r"
      [ -f "$OUT/bench.csv.skips.txt" ] && mv "$OUT/bench.csv.skips.txt" "$LOGS/"
      python3 benchmarks/summary.py "$OUT/bench.csv" --out "$OUT/bench.md" > /dev/null 2>&1
      tail -30 "$OUT/bench.md" 2> /dev/null ;;
    sequences)
      timeout "$(left "${SEQUENCES_TIMEOUT:-240}")" python3 benchmarks/bench_sequences.py --device cuda --repeats 50 \
        --out "$OUT/sequences_cuda" > "$LOGS/sequences.log" 2>&1
      r=$?; rc=$((rc | r)); summary "sequences rc=$r"; tail -30 "$OUT/sequences_cuda.md" 2> /dev/null ;;
    demo)
      timeout "$(left 180)" python3 -m fused_posenc > "$LOGS/demo.log" 2>&1
      r=$?; rc=$((rc | r)); summary "demo rc=$r $(tail -1 "$LOGS/demo.log")" ;;
    *) summary "unknown step $s"; rc=1 ;;
  esac
done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
exit $rc
