#!/usr/bin/env bash
# One call on the GPU machine: install, GPU tests, benchmark subset; logs and CSVs under $OUT.
# Usage (device tool): bash scripts/gpu_suite.sh [tests|probe|bench|all ...]
set -uo pipefail
OUT=${OUT:-/tmp/fused_posenc_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=${*:-all}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ -n "${SKIP_EXT:-}" ]; then export FUSED_POSENC_SKIP_EXT_BUILD=1; fi
start=$(date +%s)
( time MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . ) > "$OUT/install.log" 2>&1
echo "install rc=$? ($(( $(date +%s) - start ))s)"; tail -3 "$OUT/install.log"
rc=0
for s in $steps; do
  case $s in
    tests|all)
      FUSED_POSENC_AUTOTUNE=0 python3 -m pytest -q -n 8 -p no:cacheprovider tests/ -k "triton or native" \
        2>&1 | tee "$OUT/pytest_gpu.log" | tail -25; rc=$((rc | ${PIPESTATUS[0]})) ;;&
    probe|all)
      python3 scripts/gpu_probe.py --csv "$OUT/probe.csv" 2>&1 | tee "$OUT/probe.log" | tail -60 ;;&
    bench|all)
      if [ -f benchmarks/run.py ]; then
        python3 benchmarks/run.py --preset gpu-quick --out "$OUT/bench.csv" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
        tail -40 "$OUT/bench.log"
      fi ;;
  esac
done
exit $rc
