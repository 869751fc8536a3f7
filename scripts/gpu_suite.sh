#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, benchmark subset, demo; logs and CSVs under $OUT.
#
#   bash scripts/gpu_suite.sh [tests] [native] [probe] [bench] [demo]     (default: all of them)
#
# Env: SKIP_EXT=1 (no C++/CUDA build), TEST_TIMEOUT (s, per pytest step), BENCH_BUDGET (s),
#      BENCH_ARGS (extra benchmarks/run.py args), PROBE_SEQLENS (e.g. 1024,4096).
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
summary "install rc=$? ($(( $(date +%s) - start ))s)"

# pytest-xdist when present (carried as a wheel or installed), else one process
XDIST=""
python3 -c "import xdist" 2> /dev/null && XDIST="-n 8"

rc=0
run_pytest() {  # name, pytest args...
  local name=$1; shift
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -rfEs -p no:cacheprovider $XDIST "$@" > "$LOGS/pytest_$name.log" 2>&1
  local r=$?
  rc=$((rc | r))
  summary "pytest $name rc=$r: $(tail -1 "$LOGS/pytest_$name.log")"
  grep -E "^(FAILED|ERROR)" "$LOGS/pytest_$name.log" | head -20
}

for s in $steps; do
  case $s in
    tests)  FUSED_POSENC_AUTOTUNE=${FUSED_POSENC_AUTOTUNE:-0} run_pytest triton tests -k "triton" ;;
    native) run_pytest native tests/test_native_cuda.py tests/test_native_cpu.py ;;
    probe)
      timeout "${PROBE_TIMEOUT:-200}" python3 scripts/gpu_probe.py --seqlens "${PROBE_SEQLENS:-1024,4096}" \
        --csv "$OUT/probe.csv" > "$LOGS/probe.log" 2>&1
      summary "probe rc=$?"; grep -v Warn "$LOGS/probe.log" | tail -40 ;;
    bench)
      python3 benchmarks/run.py --preset gpu-quick --time-budget "${BENCH_BUDGET:-300}" ${BENCH_ARGS:-} \
        --out "$OUT/bench.csv" > "$LOGS/bench.log" 2>&1
      summary "bench rc=$?"
      [ -f "$OUT/bench.csv.skips.txt" ] && mv "$OUT/bench.csv.skips.txt" "$LOGS/"
      python3 benchmarks/summary.py "$OUT/bench.csv" --out "$OUT/bench.md" > /dev/null 2>&1
      tail -30 "$OUT/bench.md" 2> /dev/null ;;
    demo)
      timeout 180 python3 -m fused_posenc > "$LOGS/demo.log" 2>&1
      summary "demo rc=$? $(tail -1 "$LOGS/demo.log")" ;;
    *) summary "unknown step $s"; rc=1 ;;
  esac
done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
exit $rc
