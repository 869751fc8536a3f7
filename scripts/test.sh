#!/usr/bin/env bash
# Install fused_posenc from this checkout (CPU torch, no CUDA download) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" "triton>=3.6,<3.10" ninja pybind11 pytest pytest-benchmark
python -m pip install -q --no-build-isolation -e .
python -m pytest -q tests "$@"
