#!/usr/bin/env bash
# The package's main job in one command: install fused_posenc from this checkout (scripts/install.sh) and run
# every encoding through every available backend against the float64 reference (python -m fused_posenc).
# Extra arguments go to the demo, e.g.  scripts/demo.sh --encodings rope tapa --no-timing
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m fused_posenc "$@"
