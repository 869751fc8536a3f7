#!/usr/bin/env python
"""Benchmark CLI: presets, filters, CSV output.

    python benchmarks/run.py --preset cpu-tiny --out benchmarks/results/cpu-tiny.csv
    python benchmarks/run.py --preset gpu-quick --out benchmarks/results/h100-quick.csv --time-budget 330
    python benchmarks/run.py --preset gpu-full --encodings rope tapa --providers 'ours-*' 'sdpa-*' --out x.csv
    python benchmarks/run.py --list
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402,F401  (makes fused_posenc importable from a checkout)
from fused_posenc.bench import main  # noqa: E402
from providers import all_providers  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], providers=all_providers(), prog="python benchmarks/run.py"))
