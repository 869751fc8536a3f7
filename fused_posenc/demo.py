"""The package's main job: run every encoding through every available backend, check it against the
float64 reference, time it, print one table. ``python -m fused_posenc`` (exit status 1 if a check fails).

Check (FlashAttention's idiom): for the output and for dq, dk, dv,
``|backend - ref64| <= 2 * |ref_dtype - ref64| + floor(dtype)`` in max norm, where ``ref64`` is
``reference_attention`` in float64 and ``ref_dtype`` the same reference run in the input dtype.

Backends: ``torch`` always; on a GPU ``triton`` and ``cuda``; on a CPU ``cpu``, and ``triton`` only when
``TRITON_INTERPRET=1`` is set (Triton's interpreter, tiny shapes, float32, checked but not timed). A backend
that is not available is listed with the reason and skipped; one that is available but fails counts as a
failure. The ``torch`` backend is the reference formulation itself: its rows are the oracle (timed, not
checked).

Speed-up: against what a user would run without this package, on the same shape and dtype
(:data:`BASELINES`, built from :mod:`fused_posenc.bench`'s providers, PyTorch choosing the SDPA kernel, GQA
kv heads expanded): rotate + SDPA for the rotations, SDPA for ``none``, SDPA with the materialised ALiBi
bias for ``alibi``; TAPA, which SDPA cannot express, against the reference (the oracle row).

Timings: medians, on CPU tensors of at least ``--min-runs`` calls adding up to at least ``--min-time``
seconds after ``--warmup`` calls (at most ``--max-time`` seconds of calls per measurement); on CUDA tensors
``triton.testing.do_bench``'s median.

Output: one table; a note that several rows share is printed once below it, the rows pointing at it by
number; the tolerance in one line above it, the labels' meanings below it. Progress goes to stderr, on a
terminal only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from .attention import fused_attention, prepare, reference_attention
from .bench import (DTYPES, FLOOR, Provider, Shape, Skip, TimingOptions, check_provider, environment, make_inputs,
                    make_step, rotate_sdpa, sdpa, time_step)
from .encodings import NAMES
FACTOR = 2.0
TENSORS = ("out", "dq", "dk", "dv")

# encoding -> the baseline a user would otherwise run (label, provider); missing: the oracle row is the baseline
BASELINES: Dict[str, Provider] = {
    "none": Provider("sdpa", sdpa("default", expand_kv=True), ("none",), "F.scaled_dot_product_attention"),
    "alibi": Provider("sdpa+bias", sdpa("default", expand_kv=True), ("alibi",),
                      "SDPA with the (1, H, L, L) ALiBi bias materialised once, outside the timing"),
    **{e: Provider("rotate+sdpa", rotate_sdpa("default", expand_kv=True), (e,),
                   "fused_posenc.apply_rotary on q and k, then SDPA") for e in ("rope", "hope", "fope")},
}
NO_SDPA_NOTE = "SDPA cannot express this encoding: speed-up against the reference (the oracle row)"


@dataclass
class Result:
    encoding: str
    backend: str
    dtype: str
    status: str  # pass / FAIL / ERROR / skip / oracle (the reference backend: timed only) / baseline
    worst: str = ""
    err: float = float("nan")
    ref_err: float = float("nan")
    bound: float = float("nan")
    ms_fwd: Optional[float] = None
    ms_fwdbwd: Optional[float] = None
    device: str = "cpu"
    notes: List[str] = field(default_factory=list)
    group: tuple = ()  # rows of one group share a baseline: (encoding, timing shape)
    baseline: bool = False  # a baseline row (not ours: not counted in the summary or the exit status)

    @property
    def note(self) -> str:
        return "; ".join(self.notes)


def _why(e: Exception) -> str:
    """An exception as one short line (a binding's error can print whole tensors)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}{'...' if len(msg) > 200 else ''}"


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _fwd_bwd(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach()] + [g.detach() for g in grads]


def judge(errs: Dict[str, Tuple[float, float]], dtype: torch.dtype):
    """``(passed, worst tensor, its error, its reference error, its bound, notes)`` from
    ``{tensor: (error, reference error)}``: a tensor passes if ``error <= FACTOR * reference error + floor``
    (and is finite); the worst is the one nearest (or furthest past) its bound."""
    floor = FLOOR[dtype]
    worst, ok, notes = None, True, []
    for name, (e, base) in errs.items():
        bound = FACTOR * base + floor
        if not math.isfinite(e):
            ok = False
            notes.append(f"{name} not finite")
            ratio = math.inf
        else:
            ratio = e / bound
            if ratio > 1:
                ok = False
                notes.append(f"{name}: {e:.2e} > {FACTOR:g} x {base:.2e} + {floor:.0e}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, name, e, base, bound)
    return ok, worst[1], worst[2], worst[3], worst[4], notes


def check(encoding: str, backend: str, shape: Shape, seed: int = 0):
    """``(passed, worst tensor name, its error, its reference error, note)`` for one combination."""
    q, k, v = make_inputs(shape, 1, seed)[0]
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g).to(device=q.device, dtype=q.dtype)
    causal = shape.causal

    def ours(a, b, c):
        return fused_attention(a, b, c, encoding, causal=causal, backend=backend)

    def ref(a, b, c):
        return reference_attention(a, b, c, encoding, causal=causal)

    test = _fwd_bwd(ours, q, k, v, do)
    lp = _fwd_bwd(ref, q, k, v, do)
    r64 = _fwd_bwd(ref, q.double(), k.double(), v.double(), do.double())
    ok, worst, e, base, _, notes = judge({n: (_err(t, r), _err(l, r)) for n, t, l, r in zip(TENSORS, test, lp, r64)},
                                         q.dtype)
    return ok, worst, e, base, "; ".join(notes)


SPREAD = 2.0  # a timing whose 80th percentile is above SPREAD x its 20th is flagged as noisy
NOISY_NOTE = f"noisy timing: 80th percentile > {SPREAD:g} x 20th (another process on the CPU?)"


def _time_fwd(fwd, shape: Shape, opts: TimingOptions, notes: Optional[List[str]] = None):
    """``[ms fwd, ms fwd+bwd]`` (medians); appends :data:`NOISY_NOTE` to ``notes`` if either is noisy."""
    sets = make_inputs(shape)
    q = [time_step(make_step(fwd, sets, mode), shape.device, opts) for mode in ("fwd", "fwd+bwd")]
    if notes is not None and any(p80 > SPREAD * p20 for _, p20, p80 in q):
        notes.append(NOISY_NOTE)
    return [x[0] for x in q]


def timing(encoding: str, backend: str, shape: Shape, opts: TimingOptions, notes: Optional[List[str]] = None):
    """``[ms fwd, ms fwd+bwd]`` (medians) of ``fused_attention(backend=backend)``."""
    causal = shape.causal

    def fwd(a, b, c):
        return fused_attention(a, b, c, encoding, causal=causal, backend=backend)

    return _time_fwd(fwd, shape, opts, notes)


def run_baseline(encoding: str, check_shape: Shape, time_shape: Optional[Shape], opts: TimingOptions) -> Result:
    """The baseline row of ``encoding``: checked like a backend (on ``check_shape``; not counted in the exit
    status) and timed on ``time_shape``."""
    prov = BASELINES[encoding]
    res = Result(encoding, prov.name, check_shape.dtype, "baseline", device=check_shape.device, baseline=True)
    try:
        ok, res.worst, res.err, res.ref_err, res.bound, _ = judge(check_provider(prov, encoding, check_shape),
                                                                   check_shape.torch_dtype)
        if not ok:
            res.notes.append("a baseline above the bound (not counted in the exit status)")
        if time_shape is not None:
            res.ms_fwd, res.ms_fwdbwd = _time_fwd(prov.build(encoding, time_shape), time_shape, opts, res.notes)
    except Skip as e:
        res.status, res.notes = "skip", [str(e)]
    except Exception as e:
        res.status, res.notes = "skip", [f"baseline failed: {_why(e)}"]
    return res


def backend_list(device: str) -> List[tuple]:
    """``[(name, tensor device, available, why)]`` for the backends the demo runs.

    GPU machine: torch, triton, cuda on CUDA tensors, and the C++ ``cpu`` backend on CPU tensors.
    CPU machine: torch and cpu, and triton only under ``TRITON_INTERPRET=1``.
    """
    from .backends import get_backend

    if device == "cuda":
        plan = [("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")]
    else:
        plan = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
    out = []
    for name, dev in plan:
        if name == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            out.append((name, dev, False, "on CPU only with TRITON_INTERPRET=1 (Triton's interpreter)"))
            continue
        try:
            ok, why = get_backend(name).available()
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        out.append((name, dev, ok, why))
    return out


def _fmt_ms(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.3f}"


def _speedups(results: List[Result]) -> Dict[int, Tuple[Optional[float], Optional[float]]]:
    """``{id(row): (fwd, fwd+bwd)}``: the group's baseline ms over the row's ms (the oracle row's where the
    group has no baseline row)."""
    base: Dict[tuple, Result] = {}
    for r in results:
        if r.status == "baseline" and r.ms_fwd is not None:
            base[r.group] = r
    for r in results:
        if r.status == "oracle" and r.ms_fwd is not None and r.encoding not in BASELINES:
            base.setdefault(r.group, r)
    out = {}
    for r in results:
        b = base.get(r.group)
        if b is None or b is r or r.ms_fwd is None:
            continue
        out[id(r)] = tuple(None if x is None or y is None or y <= 0 else x / y
                           for x, y in ((b.ms_fwd, r.ms_fwd), (b.ms_fwdbwd, r.ms_fwdbwd)))
    return out


def tolerance_line(dtypes) -> str:
    floors = ", ".join(f"{FLOOR[DTYPES[d]]:.1e} {d}" for d in dtypes)
    return (f"check: pass if err <= {FACTOR:g} x ref + floor for each of out, dq, dk, dv (FlashAttention's idiom); "
            f"err = max |row - float64 reference|, ref = max |the same PyTorch reference in the input dtype - float64 "
            f"reference|, bound = {FACTOR:g} x ref + floor, floor = {floors}; a row shows its tensor nearest the bound")


def _fmt_x(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.3g}x"


def print_table(results: List[Result], file=None, timed: bool = True) -> None:
    """One table; every distinct note once below it, rows pointing at it by number."""
    file = sys.stdout if file is None else file
    speed = _speedups(results) if timed else {}
    notes: Dict[str, int] = {}
    devices = {r.device for r in results}
    hdr = ["encoding", "backend"] + (["device"] if len(devices) > 1 else []) + [
        "dtype", "err (tensor)", "ref err", "bound", "check"]
    if timed:
        hdr += ["ms fwd", "ms fwd+bwd", "speed-up fwd", "speed-up fwd+bwd"]
    hdr += ["notes"]
    rows = []
    for r in results:
        checked = r.status not in ("skip", "oracle") and math.isfinite(r.err)
        row = [r.encoding, r.backend] + ([r.device] if len(devices) > 1 else []) + [
            r.dtype, f"{r.err:.2e} ({r.worst})" if checked else "", f"{r.ref_err:.2e}" if checked else "",
            f"{r.bound:.2e}" if checked else "", r.status]
        row_notes = list(r.notes)
        if timed:
            sf, sb = speed.get(id(r), (None, None))
            row += [_fmt_ms(r.ms_fwd), _fmt_ms(r.ms_fwdbwd), _fmt_x(sf), _fmt_x(sb)]
            if id(r) in speed and r.encoding not in BASELINES:
                row_notes.append(NO_SDPA_NOTE)
        row.append(",".join(str(notes.setdefault(n, len(notes) + 1)) for n in row_notes))
        rows.append(row)
    w = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(hdr)]

    def line(cells):
        return "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()

    print(line(hdr), file=file)
    print(line(["-" * x for x in w]), file=file)
    for row in rows:
        print(line(row), file=file)
    for text, i in notes.items():
        print(f"[{i}] {text}", file=file)


def legend(results: List[Result], timed: bool, causal: bool) -> List[str]:
    """What the labels in the table mean, one line each, for the labels it shows."""
    out = []
    labels = {r.backend for r in results if r.baseline}
    if timed:
        out.append("speed-up = the baseline row's ms / this row's ms, same encoding, dtype and shape (> 1: faster)")
    if labels:
        out.append("baseline = what you would run without this package on the same inputs: PyTorch choosing the "
                   f"SDPA kernel, GQA kv heads expanded (repeat_interleave), is_causal={causal}:")
        for name, text in (("rotate+sdpa", "fused_posenc.apply_rotary on q and k, then "
                                           "F.scaled_dot_product_attention"),
                           ("sdpa", "F.scaled_dot_product_attention alone"),
                           ("sdpa+bias", "SDPA with the (1, H, L, L) ALiBi bias as attn_mask (built once, "
                                         "outside the timing)")):
            if name in labels:
                out.append(f"  {name:11s} = {text}")
    if any(r.status == "oracle" for r in results):
        out.append("oracle = backend torch, the reference formulation (materialised scores) in the input dtype: "
                   "timed, not checked")
    return out


def _busy() -> str:
    """A warning when other processes compete for the CPU threads the timings use, else ""."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = os.cpu_count() or 1
    if load <= max(1.0, 0.75 * cores):
        return ""
    return (f"warning: load average {load:.1f} on {cores} CPU cores (torch uses {torch.get_num_threads()} threads): "
            "other processes compete for the CPU, CPU timings will be noisy")


def _progress(msg: str) -> None:
    """Progress on a terminal's stderr, overwritten in place (the report on stdout stays one table)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + msg)
        sys.stderr.flush()


def main(argv=None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(prog="python -m fused_posenc", description="Check every encoding on every available "
                                 "backend against the float64 reference, time it, print a table.")
    ap.add_argument("--encodings", nargs="*", default=list(NAMES), choices=list(NAMES))
    ap.add_argument("--backends", nargs="*", help="subset of the backends to run (default: every available one)")
    ap.add_argument("--dtypes", nargs="*", choices=list(DTYPES),
                    help="default: bf16 fp16 on a GPU, fp32 bf16 on a CPU (fp32 for Triton's interpreter)")
    ap.add_argument("--no-timing", action="store_true", help="checks only")
    ap.add_argument("--non-causal", action="store_true", help="check non-causal attention instead of causal")
    ap.add_argument("--warmup", type=int, default=3, help="CPU timing: untimed calls first (default 3)")
    ap.add_argument("--min-runs", type=int, default=20, help="CPU timing: median of at least this many calls "
                    "(default 20)")
    ap.add_argument("--min-time", type=float, default=0.5, help="CPU timing: ... adding up to at least this many "
                    "seconds (default 0.5)")
    ap.add_argument("--max-time", type=float, default=1.0, help="CPU timing: ... but at most this many seconds "
                    "per measurement, whatever the count (default 1; a bound on a busy machine)")
    ap.add_argument("--seqlen", type=int, help="CPU check/timing sequence length (default 100)")
    args = ap.parse_args(argv)

    env = environment(device)
    causal = not args.non_causal
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    timed = not args.no_timing
    # (check shape, timing shape, default dtypes) per kind of run
    gpu_check = Shape(2, 1000, 8, 128, causal, "bf16", "cuda", nheads_kv=2)
    gpu_time = Shape(4, 2048, 16, 128, causal, "bf16", "cuda")
    cpu_check = Shape(2, args.seqlen or 100, 4, 64, causal, "fp32", "cpu", nheads_kv=2)
    interp_check = Shape(1, 48, 2, 32, causal, "fp32", "cpu")  # Triton's interpreter: tiny
    print(f"fused_posenc demo on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    gpu = device == "cuda"
    for label, sh in (("GPU check", gpu_check if gpu else None), ("GPU timing", gpu_time if gpu else None),
                      ("CPU check/timing", cpu_check),
                      ("Triton interpreter (checked, not timed)", interp_check if interp and not gpu else None)):
        if sh is not None:
            print(f"{label} shape: batch={sh.batch} seqlen={sh.seqlen} heads={sh.nheads}/{sh.hkv} (q/kv) "
                  f"headdim={sh.headdim} causal={causal}")
    backends = backend_list(device)
    for name, dev, ok, why in backends:
        if not ok:
            print(f"backend {name}: not available ({why})")
    runnable = [(n, dev) for n, dev, ok, _ in backends if ok and (not args.backends or n in args.backends)]
    print(f"backends run: {', '.join(f'{n} ({dev})' for n, dev in runnable)}")
    opts = TimingOptions(cpu_repeats=max(1, args.min_runs), cpu_warmup=max(0, args.warmup), cpu_min_s=args.min_time,
                         cpu_max_s=max(args.max_time, args.min_time))
    if timed:
        print(f"timings: median of >= {opts.cpu_repeats} calls and >= {opts.cpu_min_s:g} s (at most {opts.cpu_max_s:g} "
              f"s) after {opts.cpu_warmup} warm-up calls (time.perf_counter) on CPU tensors"
              + ("; triton.testing.do_bench median on CUDA tensors" if device == "cuda" else ""))
        busy = _busy()
        if busy:
            print(busy)
    print()
    results: List[Result] = []
    groups: Dict[tuple, List[Result]] = {}  # insertion-ordered: the table's order
    from .backends import get_backend

    def group_rows(enc, tshape, check_shape, with_baseline):
        key = (enc, tshape)
        if key not in groups:
            groups[key] = []
            if with_baseline and enc in BASELINES:
                _progress(f"{enc} {BASELINES[enc].name} {tshape.dtype} ...")
                b = run_baseline(enc, check_shape, tshape, opts)
                b.group = key
                groups[key].append(b)
        return groups[key]

    for enc in args.encodings:
        for b, dev in runnable:
            is_interp = dev == "cpu" and b == "triton"
            if dev == "cuda":
                base, tshape, dtypes = gpu_check, gpu_time, ["bf16", "fp16"]
            elif is_interp:
                base, tshape, dtypes = interp_check, interp_check, ["fp32"]
            else:
                base, tshape, dtypes = cpu_check, cpu_check, ["fp32", "bf16"]
            for dt in args.dtypes or dtypes:
                shape = replace(base, dtype=dt)
                ts = replace(tshape, dtype=dt)
                rows = group_rows(enc, ts, shape, timed and not is_interp)
                _progress(f"{enc} {b} {dt} ...")
                res = Result(enc, b, dt, "pass", device=dev, group=(enc, ts))
                try:
                    ok, why = get_backend(b).supports(prepare(*make_inputs(shape, 1)[0], enc, causal, None, None, None))
                    if not ok:
                        res.status, res.notes = "skip", [f"not supported: {why}"]
                        rows.append(res)
                        continue
                    if b != "torch":  # the torch backend is the reference itself: nothing to check
                        ok, res.worst, res.err, res.ref_err, note = check(enc, b, shape)
                        res.status = "pass" if ok else "FAIL"
                        res.bound = FACTOR * res.ref_err + FLOOR[shape.torch_dtype]
                        if note:
                            res.notes.append(note)
                    else:
                        res.status = "oracle"
                except Exception as e:
                    res.status, res.notes = "ERROR", [_why(e)]
                    if os.environ.get("FUSED_POSENC_DEBUG"):
                        traceback.print_exc()
                if res.status in ("pass", "oracle") and timed:
                    if is_interp:
                        res.notes.append("Triton's interpreter: checked, not timed")
                    else:
                        try:
                            res.ms_fwd, res.ms_fwdbwd = timing(enc, b, ts, opts, res.notes)
                        except Exception as e:
                            res.notes.append(f"timing failed: {_why(e)}")
                rows.append(res)
    _progress("")
    results = [r for rows in groups.values() for r in rows]
    ours = [r for r in results if not r.baseline]
    print(tolerance_line(list(dict.fromkeys(r.dtype for r in results))))
    print_table(results, timed=timed)
    for text in legend(results, timed, causal):
        print(text)
    failed = [r for r in ours if r.status in ("FAIL", "ERROR")]
    passed = [r for r in ours if r.status == "pass"]
    oracle = [r for r in ours if r.status == "oracle"]
    print(f"\n{len(passed)} passed, {len(failed)} failed, {len(oracle)} reference rows (timed, not checked), "
          f"{len(ours) - len(passed) - len(failed) - len(oracle)} skipped")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
