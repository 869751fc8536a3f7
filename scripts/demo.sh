#!/usr/bin/env bash
# The package's main job in one command: install fused_posenc from this checkout and run every
# encoding through every available backend against the float64 reference (python -m fused_posenc).
# Extra arguments go to the demo, e.g.  scripts/demo.sh --encodings rope tapa --no-timing
set -euo pipefail
cd "$(dirname "$0")/.."
# FUSED_POSENC_NO_INSTALL=1 skips the two installs (an offline machine whose environment is ready).
if [ "${FUSED_POSENC_NO_INSTALL:-0}" != "1" ]; then
  python -m pip install "torch==2.13.0" "triton>=3.6,<3.10" ninja pybind11
  python -m pip install --no-build-isolation -e .
fi
python -m fused_posenc "$@"
