#!/usr/bin/env bash
# Install fused_posenc from this checkout (scripts/install.sh) and run the test suite. Extra arguments go to pytest.
#   PYTEST_WORKERS: pytest-xdist workers (default: one per core, at most 4; 0 runs in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
workers=${PYTEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}
xdist=()
[ "$workers" != "0" ] && xdist=(-n "$workers" --dist worksteal)  # worksteal: an idle worker takes queued tests
# -rs: every skip with its reason; --durations: the slowest tests, for keeping CI under 30 minutes
python -m pytest -q -rs --durations=25 "${xdist[@]}" tests "$@"
