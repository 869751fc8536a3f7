"""The study's outputs from its results CSV: a Markdown table (mean +- std over seeds per encoding, task and
evaluation length) and a PNG plot (one panel per task, one line per encoding, error bars over seeds)."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from .tasks import METRIC, TASKS

FIELDS = ("encoding", "task", "seed", "train_len", "eval_len", "factor", "metric", "value", "loss", "accuracy",
          "train_loss", "params", "train_s", "eval_s")

_TASK_TITLE = {"passkey": "passkey retrieval (accuracy, higher is better)",
               "recall": "associative recall (accuracy, higher is better)",
               "lm": "language modelling (loss in nats/token, lower is better)"}


def read_rows(path: str) -> List[dict]:
    """The rows of a results CSV (numbers parsed); ``[]`` if there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("seed", "train_len", "eval_len", "factor", "params"):
            r[k] = int(r[k])
        for k in ("value", "loss", "accuracy", "train_loss", "train_s", "eval_s"):
            r[k] = float(r[k])
    return rows


def append_rows(path: str, rows: Sequence[dict]) -> None:
    """Append rows to a results CSV, writing the header first if the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})


def summarise(rows: Sequence[dict]) -> Dict[Tuple[str, str, int], Tuple[float, float, int]]:
    """``(task, encoding, eval_len) -> (mean, std, seeds)`` of each cell's metric (std: sample std, 0 for one
    seed)."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["encoding"], r["eval_len"])].append(r["value"])
    out = {}
    for key, vals in cells.items():
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out[key] = (m, sd, len(vals))
    return out


def _order(rows: Sequence[dict], key: str, preferred: Sequence[str]) -> List[str]:
    seen = {r[key] for r in rows}
    return [x for x in preferred if x in seen] + sorted(seen - set(preferred))


def markdown_tables(rows: Sequence[dict], encodings_order: Sequence[str]) -> str:
    """One table per task: a row per encoding, a column per evaluation length, ``mean +- std (n seeds)``;
    the best mean per column in bold."""
    stats = summarise(rows)
    parts = []
    for task in _order(rows, "task", TASKS):
        encs = _order([r for r in rows if r["task"] == task], "encoding", encodings_order)
        lens = sorted({r["eval_len"] for r in rows if r["task"] == task})
        train_len = next(r["train_len"] for r in rows if r["task"] == task)
        higher = METRIC[task] == "accuracy"
        best = {}
        for n in lens:
            vals = [stats[(task, e, n)][0] for e in encs if (task, e, n) in stats]
            best[n] = (max if higher else min)(vals) if vals else None
        head = " | ".join(f"{n} ({n // train_len}L)" for n in lens)
        parts.append(f"### {_TASK_TITLE.get(task, task)}\n\n| encoding | {head} |\n|---|" + "---|" * len(lens))
        for e in encs:
            cells = []
            for n in lens:
                if (task, e, n) not in stats:
                    cells.append("")
                    continue
                m, sd, k = stats[(task, e, n)]
                txt = f"{m:.3f} ± {sd:.3f}"
                cells.append(f"**{txt}**" if best[n] is not None and m == best[n] else txt)
            parts.append(f"| {e} | " + " | ".join(cells) + " |")
        seeds = sorted({r["seed"] for r in rows if r["task"] == task})
        parts.append(f"\nMean ± sample std over seeds {seeds}; training length L = {train_len}.\n")
    return "\n".join(parts)


def plot(rows: Sequence[dict], path: str, encodings_order: Sequence[str], title: str = "") -> None:
    """One panel per task: the metric versus evaluation length (log2 axis), a line per encoding with error
    bars (sample std over seeds), the training length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    tasks = _order(rows, "task", TASKS)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        encs = _order([r for r in rows if r["task"] == task], "encoding", encodings_order)
        train_len = next(r["train_len"] for r in rows if r["task"] == task)
        for e in encs:
            lens = sorted(n for (t, enc, n) in stats if t == task and enc == e)
            means = [stats[(task, e, n)][0] for n in lens]
            sds = [stats[(task, e, n)][1] for n in lens]
            ax.errorbar(lens, means, yerr=sds, marker="o", markersize=3, capsize=3, label=e,
                        linestyle="--" if e == "none" else "-")
        ax.axvline(train_len, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ticks = sorted({n for (t, _, n) in stats if t == task})
        ax.set_xticks(ticks, [f"{n}\n{n // train_len}L" for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("evaluation length (tokens); dotted: training length L")
        ax.set_ylabel(METRIC[task])
        ax.set_title(_TASK_TITLE.get(task, task), fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
