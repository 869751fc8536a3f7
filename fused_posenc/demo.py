"""The package's main job: run every encoding through every available backend, check it against the
float64 reference, time it, print a table. ``python -m fused_posenc`` (exit status 1 if a check fails).

Check (FlashAttention's idiom): for the output and for dq, dk, dv,
``|backend - ref64| <= 2 * |ref_dtype - ref64| + floor(dtype)`` in max norm, where ``ref64`` is
``reference_attention`` in float64 and ``ref_dtype`` the same reference run in the input dtype.

Backends: ``torch`` always; on a GPU ``triton`` and ``cuda``; on a CPU ``cpu``, and ``triton`` only when
``TRITON_INTERPRET=1`` is set (Triton's interpreter, tiny shapes, float32). A backend that is not
available is listed with the reason and skipped; one that is available but fails counts as a failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass, replace
from typing import List, Optional

import torch

from .attention import fused_attention, prepare, reference_attention
from .bench import DTYPES, FLOOR, Shape, TimingOptions, environment, make_inputs, make_step, time_step
from .encodings import NAMES
FACTOR = 2.0


@dataclass
class Result:
    encoding: str
    backend: str
    dtype: str
    status: str  # pass / FAIL / ERROR / skip / oracle (the reference backend: timed only)
    worst: str = ""
    err: float = float("nan")
    ref_err: float = float("nan")
    ms_fwd: Optional[float] = None
    ms_fwdbwd: Optional[float] = None
    note: str = ""


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _fwd_bwd(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach()] + [g.detach() for g in grads]


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
    floor = FLOOR[q.dtype]
    worst, ok, notes = None, True, []
    for name, t, l, r in zip(("out", "dq", "dk", "dv"), test, lp, r64):
        if not torch.isfinite(t).all():
            ok = False
            notes.append(f"{name} not finite")
        e, base = _err(t, r), _err(l, r)
        ratio = e / (FACTOR * base + floor)
        if ratio > 1:
            ok = False
            notes.append(f"{name}: {e:.2e} > {FACTOR} x {base:.2e} + {floor:.0e}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, name, e, base)
    return ok, worst[1], worst[2], worst[3], "; ".join(notes)


def timing(encoding: str, backend: str, shape: Shape, opts: TimingOptions):
    sets = make_inputs(shape)
    causal = shape.causal

    def fwd(a, b, c):
        return fused_attention(a, b, c, encoding, causal=causal, backend=backend)

    out = []
    for mode in ("fwd", "fwd+bwd"):
        out.append(time_step(make_step(fwd, sets, mode), shape.device, opts)[0])
    return out


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


def print_table(results: List[Result], file=sys.stdout) -> None:
    hdr = ("encoding", "backend", "dtype", "max err", "ref err", "check", "ms fwd", "ms fwd+bwd")
    rows = [(r.encoding, r.backend, r.dtype, "" if r.status in ("skip", "oracle") else f"{r.err:.2e} ({r.worst})",
             "" if r.status in ("skip", "oracle") else f"{r.ref_err:.2e}", r.status, _fmt_ms(r.ms_fwd), _fmt_ms(r.ms_fwdbwd))
            for r in results]
    w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)), file=file)
    print("  ".join("-" * w[i] for i in range(len(hdr))), file=file)
    for row in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(row)), file=file)
    notes = [r for r in results if r.note]
    for r in notes:
        print(f"  {r.encoding}/{r.backend}/{r.dtype}: {r.note}", file=file)


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
    args = ap.parse_args(argv)

    env = environment(device)
    causal = not args.non_causal
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    # (check shape, timing shape, default dtypes) per kind of run
    gpu_check = Shape(2, 1000, 8, 128, causal, "bf16", "cuda", nheads_kv=2)
    gpu_time = Shape(4, 2048, 16, 128, causal, "bf16", "cuda")
    cpu_check = Shape(2, 100, 4, 64, causal, "fp32", "cpu", nheads_kv=2)
    interp_check = Shape(1, 48, 2, 32, causal, "fp32", "cpu")  # Triton's interpreter: tiny
    print(f"fused_posenc demo on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})")
    for label, sh in (("GPU check", gpu_check if device == "cuda" else None), ("GPU timing", gpu_time if device == "cuda" else None),
                      ("CPU check/timing", cpu_check), ("Triton interpreter", interp_check if interp and device == "cpu" else None)):
        if sh is not None:
            print(f"{label} shape: batch={sh.batch} seqlen={sh.seqlen} heads={sh.nheads}/{sh.hkv} (q/kv) "
                  f"headdim={sh.headdim} causal={causal}")
    backends = backend_list(device)
    for name, dev, ok, why in backends:
        if not ok:
            print(f"backend {name}: not available ({why})")
    runnable = [(n, dev) for n, dev, ok, _ in backends if ok and (not args.backends or n in args.backends)]
    print(f"backends run: {', '.join(f'{n} ({dev})' for n, dev in runnable)}")
    print()
    opts = TimingOptions(cpu_repeats=3)
    results: List[Result] = []
    from .backends import get_backend

    for enc in args.encodings:
        for b, dev in runnable:
            if dev == "cuda":
                base, tshape, dtypes = gpu_check, gpu_time, ["bf16", "fp16"]
            elif b == "triton":
                base, tshape, dtypes = interp_check, interp_check, ["fp32"]
            else:
                base, tshape, dtypes = cpu_check, cpu_check, ["fp32", "bf16"]
            for dt in args.dtypes or dtypes:
                shape = replace(base, dtype=dt)
                res = Result(enc, b, dt, "pass")
                try:
                    ok, why = get_backend(b).supports(prepare(*make_inputs(shape, 1)[0], enc, causal, None, None, None))
                    if not ok:
                        res.status, res.note = "skip", f"not supported: {why}"
                        results.append(res)
                        continue
                    if b == "torch":  # the reference itself: nothing to check, timed as the baseline
                        res.status, res.note = "oracle", "the reference (timing baseline, not checked)"
                    else:
                        ok, res.worst, res.err, res.ref_err, res.note = check(enc, b, shape)
                        res.status = "pass" if ok else "FAIL"
                except Exception as e:
                    res.status, res.note = "ERROR", f"{type(e).__name__}: {e}"
                    if os.environ.get("FUSED_POSENC_DEBUG"):
                        traceback.print_exc()
                if res.status in ("pass", "oracle") and not args.no_timing:
                    try:
                        res.ms_fwd, res.ms_fwdbwd = timing(enc, b, replace(tshape, dtype=dt), opts)
                    except Exception as e:
                        res.note = f"timing failed: {type(e).__name__}: {e}"
                results.append(res)
                print(f"  {enc:6s} {b:7s} {dt:5s} {res.status}", flush=True)
    print()
    print_table(results)
    failed = [r for r in results if r.status in ("FAIL", "ERROR")]
    passed = [r for r in results if r.status == "pass"]
    oracle = [r for r in results if r.status == "oracle"]
    print(f"\n{len(passed)} passed, {len(failed)} failed, {len(oracle)} reference rows (timed, not checked), "
          f"{len(results) - len(passed) - len(failed) - len(oracle)} skipped"
          " (timings: triton.testing.do_bench median on CUDA tensors, perf_counter median of 3 on CPU tensors)")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
