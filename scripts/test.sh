#!/usr/bin/env bash
# Install fused_posenc from this checkout (scripts/install.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -rs tests "$@"   # -rs: every skip with its reason
