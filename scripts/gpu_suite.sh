#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, benchmark subset; logs and CSVs under $OUT.
# Usage: bash scripts/gpu_suite.sh [tests] [native] [probe] [bench] [demo]   (default: all of them)
# Env: SKIP_EXT=1 (no C++/CUDA build), TEST_TIMEOUT, BENCH_BUDGET (seconds), BENCH_ARGS (extra run.py args).
set -uo pipefail
OUT=${OUT:-/tmp/fused_posenc_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-tests native probe bench demo}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -n "${SKIP_EXT:-}" ]; then export FUSED_POSENC_SKIP_EXT_BUILD=1; fi
start=$(date +%s)
( time MAX_JOBS=16 FUSED_POSENC_CUDA_ARCHS=90 python3 -m pip install -q --no-deps --no-build-isolation -e . ) > "$OUT/install.log" 2>&1
echo "install rc=$? ($(( $(date +%s) - start ))s)"; tail -3 "$OUT/install.log"
rc=0
for s in $steps; do
  case $s in
    tests)
      FUSED_POSENC_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v -n 14 -p no:cacheprovider tests/ -k triton \
        > "$OUT/pytest_triton.log" 2>&1; r=$?; rc=$((rc | r))
      echo "triton tests rc=$r"; grep -E "FAILED|ERROR" "$OUT/pytest_triton.log" | grep -v "^FAILED\b" | head -20; tail -3 "$OUT/pytest_triton.log" ;;
    native)
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v -n 8 -p no:cacheprovider tests/ -k native \
        > "$OUT/pytest_native.log" 2>&1; r=$?; rc=$((rc | r))
      echo "native tests rc=$r"; grep -E "FAILED|ERROR" "$OUT/pytest_native.log" | head -20; tail -3 "$OUT/pytest_native.log" ;;
    probe)
      timeout ${PROBE_TIMEOUT:-200} python3 scripts/gpu_probe.py --seqlens ${PROBE_SEQLENS:-1024,4096} --csv "$OUT/probe.csv" \
        > "$OUT/probe.log" 2>&1; cat "$OUT/probe.log" | grep -v Warn ;;
    bench)
      python3 benchmarks/run.py --preset gpu-quick --time-budget ${BENCH_BUDGET:-300} ${BENCH_ARGS:-} --out "$OUT/bench.csv" \
        > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
      python3 benchmarks/summary.py "$OUT/bench.csv" --out "$OUT/bench.md" > /dev/null 2>&1; tail -30 "$OUT/bench.md" ;;
    demo)
      timeout 120 python3 -m fused_posenc --no-timing > "$OUT/demo.log" 2>&1; echo "demo rc=$?"; tail -15 "$OUT/demo.log" ;;
  esac
done
exit $rc
