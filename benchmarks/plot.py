#!/usr/bin/env python
"""PNG plots from benchmark CSVs: TFLOP/s and speedup curves versus seqlen.

For every GPU, config (head dim, causal, dtype, heads) and mode it writes
``<outdir>/<gpu>_<config>_<mode>_tflops.png`` (one panel per encoding, one curve per provider, our
no-encoding kernel dashed as the ceiling) and ``..._speedup.png`` (our best backend's speedup over each
baseline: time_baseline / time_ours; > 1 means we are faster).

    python benchmarks/plot.py benchmarks/results/h100-quick.csv --outdir benchmarks/results/plots

matplotlib is optional for the package; this script needs it (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import RESULTS_DIR, Table, group_label, load_rows  # noqa: E402


def _import_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def _axes(ax, xs, title, ylabel, zero=True):
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in xs])
        ax.minorticks_off()
    if zero:
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.set_xlabel("seqlen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot(rows: List[dict], outdir: str) -> List[str]:
    plt = _import_matplotlib()
    if plt is None:
        raise RuntimeError("plot.py needs matplotlib: python -m pip install matplotlib")
    os.makedirs(outdir, exist_ok=True)
    t = Table(rows)
    written = []
    for gpu in t.gpus():
        for group in t.groups(gpu):
            for mode in t.modes(gpu, group):
                kernels = [k for k in t.kernels(gpu, group) if t.providers(gpu, group, k, mode)]
                if not kernels:
                    continue
                stem = os.path.join(outdir, f"{_slug(gpu)}_{_slug(group_label(group))}_{_slug(mode)}")
                ncol = min(3, len(kernels))
                nrow = (len(kernels) + ncol - 1) // ncol
                # throughput
                fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
                for ax, k in zip(axes.flat, kernels):
                    for p in t.providers(gpu, group, k, mode, "throughput"):
                        s = t.series(gpu, group, k, p, mode, "throughput")
                        if s:
                            ax.plot(list(s), list(s.values()), marker="o", label=p,
                                    linewidth=2.2 if p.startswith("ours-") else 1.2)
                    for p in t.providers(gpu, group, "none", mode, "throughput"):
                        if p.startswith("ours-") and k != "none":
                            s = t.series(gpu, group, "none", p, mode, "throughput")
                            ax.plot(list(s), list(s.values()), "k--", linewidth=1, label=f"{p} none (ceiling)")
                    _axes(ax, sorted({x for ln in ax.lines for x in ln.get_xdata()}), k, "TFLOP/s")
                    ax.legend(fontsize=7)
                for ax in list(axes.flat)[len(kernels):]:
                    ax.axis("off")
                fig.suptitle(f"{gpu}: {group_label(group)}, {mode}")
                fig.tight_layout()
                fig.savefig(stem + "_tflops.png", dpi=110)
                plt.close(fig)
                written.append(stem + "_tflops.png")
                # speedup of our best backend over each baseline
                fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
                drew = False
                for ax, k in zip(axes.flat, kernels):
                    ours = {}
                    for p in t.providers(gpu, group, k, mode):
                        if p.startswith("ours-"):
                            for x, v in t.series(gpu, group, k, p, mode).items():
                                ours[x] = min(v, ours.get(x, float("inf")))
                    for p in t.providers(gpu, group, k, mode):
                        if p.startswith("ours-"):
                            continue
                        s = t.series(gpu, group, k, p, mode)
                        xs = sorted(set(s) & set(ours))
                        if xs:
                            drew = True
                            ax.plot(xs, [s[x] / ours[x] for x in xs], marker="o", label=f"vs {p}")
                    xs = sorted({x for ln in ax.lines for x in ln.get_xdata()})
                    ax.axhline(1.0, color="k", linewidth=0.8)
                    _axes(ax, xs, k, "speedup (x)")
                    if ax.lines[1:]:
                        ax.legend(fontsize=7)
                for ax in list(axes.flat)[len(kernels):]:
                    ax.axis("off")
                fig.suptitle(f"{gpu}: ours (best backend) vs baselines, {group_label(group)}, {mode}")
                fig.tight_layout()
                if drew:
                    fig.savefig(stem + "_speedup.png", dpi=110)
                    written.append(stem + "_speedup.png")
                plt.close(fig)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--outdir", default=os.path.join(RESULTS_DIR, "plots"))
    args = ap.parse_args(argv)
    if _import_matplotlib() is None:
        print("plot.py needs matplotlib, which is not installed: python -m pip install matplotlib", file=sys.stderr)
        return 2
    for path in plot(load_rows(args.csv), args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
