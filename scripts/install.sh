#!/usr/bin/env bash
# Install fused_posenc from this checkout with its dependencies (used by demo.sh and test.sh).
# A second run takes seconds: the dependencies are installed only when one is missing or at a wrong version,
# and the C++ extension is rebuilt only when what it is built from changed (scripts/install_state.py keeps
# a stamp under build/); a build shows ninja's [n/m] steps and keeps its full log in build/install-ext.log.
#   TORCH_INDEX_URL: where torch 2.13.0 comes from, e.g. https://download.pytorch.org/whl/cpu for the CPU
#                    wheel (plain PyPI serves the CUDA build on Linux); default: pip's configured index.
#   FUSED_POSENC_NO_INSTALL=1: install nothing (an offline machine whose environment is ready).
#   FUSED_POSENC_REBUILD=1: rebuild the extension even if the stamp says it is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${FUSED_POSENC_NO_INSTALL:-0}" = "1" ] && exit 0
export PYTHONUNBUFFERED=1

# What the package, its build (--no-build-isolation: setuptools from here) and the test suite need;
# numpy: Triton's interpreter (TRITON_INTERPRET=1, the CPU test run) imports it, and so do tests; tqdm: examples/.
# transformers: the Hugging Face integration's tests (fused_posenc.integrations.transformers; the [hf] extra);
# pytest-xdist: scripts/test.sh runs the suite on every core (-n); matplotlib: the study's and the benchmarks' plots.
REQS=("torch==2.13.0" "triton>=3.6,<3.10" numpy ninja pybind11 "setuptools>=64" pytest pytest-benchmark pytest-xdist
      tqdm matplotlib "transformers>=5.0,<6")

if why=$(python scripts/install_state.py deps "${REQS[@]}"); then
  echo "install.sh: dependencies already installed (${REQS[*]})"
else
  echo "install.sh: installing the dependencies ($why)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
  fi
  python -m pip install -q "${REQS[@]}"
fi

inputs=$(python scripts/install_state.py inputs)  # hashed before the build: an edit during it forces the next one
if [ "${FUSED_POSENC_REBUILD:-0}" != "1" ] && why=$(python scripts/install_state.py check "$inputs"); then
  echo "install.sh: fused_posenc and its C++ extension are up to date (no rebuild; FUSED_POSENC_REBUILD=1 forces one)"
  exit 0
fi
[ "${FUSED_POSENC_REBUILD:-0}" = "1" ] && why="FUSED_POSENC_REBUILD=1"
echo "install.sh: building the C++ extension (a few minutes on 2 cores)... [$why]"
mkdir -p build
log=build/install-ext.log
# pip -v streams the build; show ninja's steps as "[n/m] <source>", keep everything in the log
if ! python -m pip install -v --no-build-isolation -e . 2>&1 | tee "$log" \
    | sed -un -e "s|$PWD/||g;ta" -e ":a" -e 's/^ *\(\[[0-9]*\/[0-9]*\]\).* -c \([^ ]*\) -o .*/  \1 compiling \2/p;t' \
              -e 's/^ *\(\[[0-9]*\/[0-9]*\]\).*/  \1/p;t' -e 's/^\(Successfully installed .*\)/  \1/p'; then
  echo "install.sh: the build failed; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
python scripts/install_state.py write "$inputs"
if why=$(python scripts/install_state.py check "$inputs"); then
  echo "install.sh: built (log: $log)"
else
  echo "install.sh: installed, but the check after the build failed: $why (log: $log)" >&2
  exit 1
fi
