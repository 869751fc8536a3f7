#!/usr/bin/env bash
# Install fused_posenc from this checkout with its dependencies (used by demo.sh and test.sh).
#   TORCH_INDEX_URL: where torch 2.13.0 comes from, e.g. https://download.pytorch.org/whl/cpu for the CPU
#                    wheel (plain PyPI serves the CUDA build on Linux); default: pip's configured index.
#   FUSED_POSENC_NO_INSTALL=1: install nothing (an offline machine whose environment is ready).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${FUSED_POSENC_NO_INSTALL:-0}" = "1" ] && exit 0
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install -q --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
fi
python -m pip install -q "torch==2.13.0" "triton>=3.6,<3.10" ninja pybind11 pytest pytest-benchmark
python -m pip install -q --no-build-isolation -e .
