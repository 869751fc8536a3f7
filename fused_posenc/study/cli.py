"""``python -m fused_posenc.study``: which encoding keeps working beyond its training length?

Trains one tiny causal LM (:class:`fused_posenc.nn.TinyLM`, the package's own fused attention layer) per
encoding x task x seed at the training length L and evaluates each at L, 2L, 4L, 8L, 16L::

    python -m fused_posenc.study                      # the full study (~1 h on a 2-core CPU, minutes on a GPU)
    python -m fused_posenc.study --quick --out /tmp/q  # the CI smoke test of the whole pipeline (< 3 min)
    python -m fused_posenc.study --seeds 5             # resumes: only the missing cells are trained

Writes to ``--out`` (default ``benchmarks/results/length_generalization``): ``results.csv`` (long format, a
row per encoding x task x seed x evaluation length, appended as each model finishes, so an interrupted run
resumes where it stopped), ``run.json`` (configuration, device, versions, commit, wall time), ``results.md``
(the tables) and ``plot.png``. The tasks are in :mod:`fused_posenc.study.tasks`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch
from tqdm import tqdm

from . import report
from .tasks import TASKS
from .train import ENCODINGS, StudyConfig, run_cell

DEFAULT_OUT = os.path.join("benchmarks", "results", "length_generalization")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fused_posenc.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test, not results")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per cell (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="override the configuration's training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="fused_attention backend (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for these tiny models on a busy CPU)")
    p.add_argument("--fresh", action="store_true", help="discard the results already in --out")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _load_meta(path: str, cfg: StudyConfig) -> dict:
    """``run.json``: ``{"config": ..., "runs": [one entry per invocation that trained models]}``."""
    if not os.path.exists(path):
        return {"config": asdict(cfg), "runs": []}
    with open(path) as f:
        meta = json.load(f)
    if meta.get("config") != json.loads(json.dumps(asdict(cfg))):
        raise SystemExit(f"{path} was written with another configuration ({meta.get('config')}); "
                         "pass --fresh to discard those results, or another --out")
    if "runs" not in meta:  # the first format: one run's fields at the top level
        meta["runs"] = [{k: meta.pop(k) for k in ("command", "device", "backend", "torch", "commit", "wall_s",
                                                   "cells") if k in meta}]
        meta["runs"][0]["models"] = meta["runs"][0].pop("cells", 0)
    return meta


def write_outputs(out: str, rows: List[dict], meta: dict, encodings: List[str]) -> None:
    """``results.md`` and ``plot.png`` from the rows so far."""
    cfg = meta["config"]
    header = [
        "# Length generalisation: tiny LMs per encoding, trained at L, evaluated up to "
        f"{max(cfg['eval_factors'])}L",
        "",
        "Generated by `python -m fused_posenc.study` (`fused_posenc/study/`); the observations are in "
        "[README.md](README.md). Plot: [plot.png](plot.png); every number: [results.csv](results.csv).",
        "",
        *[f"- {'command' if i == 0 else 'resumed with'}: `{r['command']}` on {r['device']} (backend "
          f"`{r['backend']}`), torch {r['torch']}, commit {r['commit']}: {r['models']} models in "
          f"{r['wall_s'] / 60:.1f} min" for i, r in enumerate(meta["runs"])],
        f"- model: TinyLM, {cfg['num_layers']} layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads "
        f"(head dim {cfg['d_model'] // cfg['num_heads']}), MLP x{cfg['mlp_ratio']}, "
        f"{rows[0]['params'] if rows else '?'} parameters",
        f"- training: {cfg['steps']} steps of {cfg['batch']} fresh sequences of L = {cfg['train_len']} tokens, "
        f"AdamW lr {cfg['lr']} (warmup {cfg['warmup']}, cosine to 10%), clip 1.0; the same for every encoding",
        f"- evaluation: {cfg['eval_sequences']} fixed sequences per task and length, the same for every model",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(header) + "\n" + report.markdown_tables(rows, encodings))
    report.plot(rows, os.path.join(out, "plot.png"), encodings,
                title=f"TinyLM trained at L={cfg['train_len']}; mean ± std over seeds; "
                      f"{meta['runs'][0]['device'] if meta['runs'] else ''}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    csv_path, meta_path = os.path.join(args.out, "results.csv"), os.path.join(args.out, "run.json")
    if args.fresh:
        for p in (csv_path, meta_path):
            if os.path.exists(p):
                os.remove(p)
    meta = _load_meta(meta_path, cfg)
    rows = report.read_rows(csv_path)
    done = {(r["encoding"], r["task"], r["seed"]) for r in rows}
    cells = [(e, t, s) for s in range(args.seeds) for t in args.tasks for e in args.encodings
             if (e, t, s) not in done]
    command = "python -m fused_posenc.study " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    run = {"command": command.strip(), "device": _device_name(args.device), "backend": args.backend,
           "torch": torch.__version__, "commit": _commit(), "models": 0, "wall_s": 0.0}
    print(f"study: {len(done)} models already in {csv_path}, {len(cells)} to train on {run['device']}")
    for i, (enc, task, seed) in enumerate(cells):
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, desc=f"[{i + 1}/{len(cells)}] {task} {enc} seed {seed}", leave=False,
                   dynamic_ncols=True, disable=None)  # no bar when not a terminal (CI logs)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

        new = list(run_cell(enc, task, seed, cfg, args.device, args.backend, on_step))
        bar.close()
        report.append_rows(csv_path, new)
        rows += new
        if run["models"] == 0:
            meta["runs"].append(run)
        run["wall_s"] += time.perf_counter() - t0
        run["models"] += 1
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        summary = " ".join(f"{r['factor']}L:{r['value']:.3f}" for r in new)
        tqdm.write(f"[{i + 1}/{len(cells)}] {task:7s} {enc:14s} seed {seed}: {new[0]['metric']} {summary} "
                   f"({new[0]['train_s']:.0f} s)")
    if not rows:
        print("study: no results")
        return 1
    write_outputs(args.out, rows, meta, args.encodings)
    print(f"study: wrote {csv_path}, results.md and plot.png in {args.out}")
    return 0

