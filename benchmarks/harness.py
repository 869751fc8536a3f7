"""The benchmark harness: the timing core lives in ``fused_posenc.bench`` (so ``python -m fused_posenc.bench``
works from an installed package); this module re-exports it and adds the CSV readers that
``summary.py`` and ``plot.py`` share.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

try:
    import fused_posenc  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_posenc.bench import (CSV_FIELDS, ENCODINGS, MODES, NSETS, Provider, Runner, Shape, Skip, Sweep,  # noqa: F401
                                TimingOptions, core_providers, environment, flops, make_inputs, make_step,
                                parse_config, peak_memory_mib, presets, time_step, tokens_shape)

__all__ = ["CSV_FIELDS", "ENCODINGS", "MODES", "NSETS", "Provider", "Runner", "Shape", "Skip", "Sweep", "TimingOptions",
           "core_providers", "environment", "flops", "make_inputs", "make_step", "parse_config", "peak_memory_mib",
           "presets", "time_step", "tokens_shape", "RESULTS_DIR", "load_rows", "group_of", "group_label", "value",
           "Table"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GROUP_KEYS = ("headdim", "causal", "dtype", "nheads", "nheads_kv")


def load_rows(paths: Iterable[str]) -> List[dict]:
    """Rows of one or more result CSVs; checks the header against :data:`CSV_FIELDS`."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = set(CSV_FIELDS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not a benchmark CSV, missing columns {sorted(missing)}")
            rows.extend(reader)
    return rows


def group_of(config: str) -> Tuple:
    """The curve a row belongs to: everything in ``config`` except batch and seqlen (``x``)."""
    c = parse_config(config)
    return tuple((k, c.get(k)) for k in GROUP_KEYS)


def group_label(group: Tuple) -> str:
    g = dict(group)
    gqa = "" if g.get("nheads_kv") == g.get("nheads") else f" hkv{g.get('nheads_kv')}"
    return f"hdim {g['headdim']}, {'causal' if g['causal'] else 'non-causal'}, {g['dtype']}, {g['nheads']} heads{gqa}"


def value(row: dict, which: str = "p50") -> Optional[float]:
    try:
        return float(row[which])
    except (TypeError, ValueError):
        return None


class Table:
    """``(gpu, group, kernel, provider, mode, metric) -> {seqlen: row}`` over loaded rows."""

    def __init__(self, rows: List[dict]):
        self.data: Dict[tuple, Dict[int, dict]] = defaultdict(dict)
        for r in rows:
            key = (r["gpu"], group_of(r["config"]), r["kernel"], r["provider"], r["mode"], r["metric"])
            self.data[key][int(r["x"])] = r

    def gpus(self) -> List[str]:
        return sorted({k[0] for k in self.data})

    def groups(self, gpu: str) -> List[tuple]:
        return sorted({k[1] for k in self.data if k[0] == gpu}, key=str)

    def providers(self, gpu, group, kernel, mode, metric="time") -> List[str]:
        return sorted({k[3] for k in self.data if k[:3] == (gpu, group, kernel) and k[4:] == (mode, metric)})

    def kernels(self, gpu, group) -> List[str]:
        ks = {k[2] for k in self.data if k[:2] == (gpu, group)}
        return [e for e in ENCODINGS if e in ks] + sorted(ks - set(ENCODINGS))

    def modes(self, gpu, group) -> List[str]:
        ms = {k[4] for k in self.data if k[:2] == (gpu, group)}
        return [m for m in MODES if m in ms]

    def series(self, gpu, group, kernel, provider, mode, metric="time") -> Dict[int, float]:
        d = self.data.get((gpu, group, kernel, provider, mode, metric), {})
        return {x: v for x, r in sorted(d.items()) if (v := value(r)) is not None}
