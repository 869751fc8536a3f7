"""backend="cpu" (the C++ extension) vs the PyTorch reference (backend="torch") on CPU.

Batch 1, 4 heads, headdim 64, fp32, causal; seqlen 512..4096; forward and forward+backward. Time: median
(p20/p80) of a few runs after a warm-up. Peak memory: each (provider, mode, seqlen, encoding) runs in a fresh
subprocess and reports ``ru_maxrss`` after the call minus ``ru_maxrss`` just before it (inputs and one tiny
warm-up call already made), i.e. the extra resident memory the call needed.

    python benchmarks/bench_native_cpu.py [--seqlens 512 1024] [--encodings rope fope] [--repeats 5]

Writes benchmarks/results/cpu_native.csv (the harness's long format) and benchmarks/results/cpu_native.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PROVIDERS = {"native-cpu": "cpu", "reference": "torch"}
HEADER = "kernel,provider,mode,metric,unit,x,p50,p20,p80,config,gpu,torch,triton,commit"


def _child(args):
    """Run one config in this (fresh) process; print a JSON line with the times and the peak memory."""
    import resource
    import statistics
    import time

    import torch

    sys.path.insert(0, ROOT)
    from fused_posenc import fused_attention

    torch.manual_seed(0)
    L, enc, backend, mode, reps = args.seqlen, args.encoding, args.backend, args.mode, args.repeats
    q, k, v = (torch.randn(1, L, 4, 64, requires_grad=(mode == "fwd+bwd")) for _ in range(3))
    do = torch.randn(1, L, 4, 64)

    def call(q, k, v):
        out = fused_attention(q, k, v, enc, causal=True, backend=backend)
        if mode == "fwd+bwd":
            out.backward(do if out.shape == do.shape else torch.ones_like(out))
        return out

    qs, ks, vs = (t[:, :64].detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v))
    do_full = do
    do = do_full[:, :64]
    call(qs, ks, vs)  # warm-up (lazy init, extension load)
    do = do_full
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(reps + 1):
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            call(q, k, v)
        dt = time.perf_counter() - t0
        if i:  # the first full-size call is a warm-up too
            times.append(dt)
        if i == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    q20 = times[max(0, int(0.2 * (len(times) - 1)))]
    q80 = times[min(len(times) - 1, int(round(0.8 * (len(times) - 1))))]
    print(json.dumps({"p50": statistics.median(times) * 1e3, "p20": q20 * 1e3, "p80": q80 * 1e3,
                      "mem": max(0, peak - base) / 1024.0}))


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--encodings", nargs="+", default=["rope", "fope"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(RESULTS, "cpu_native"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seqlen", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--encoding", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    import torch

    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "n/a"
    commit, tver = _commit(), torch.__version__
    rows, table = [], {}
    for enc in args.encodings:
        for mode in args.modes:
            for L in args.seqlens:
                for prov, backend in PROVIDERS.items():
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--seqlen", str(L), "--encoding", enc,
                           "--backend", backend, "--mode", mode, "--repeats", str(args.repeats)]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"FAILED {enc} {prov} {mode} {L}:\n{r.stderr[-2000:]}", file=sys.stderr)
                        continue
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    cfg = f"batch=1;seqlen={L};nheads=4;nheads_kv=4;headdim=64;causal=1;dtype=fp32;threads={torch.get_num_threads()}"
                    rows.append(f"{enc},{prov},{mode},time,ms,{L},{res['p50']:.6g},{res['p20']:.6g},{res['p80']:.6g},"
                                f"{cfg},cpu,{tver},{tv},{commit}")
                    rows.append(f"{enc},{prov},{mode},peak_mem,MiB,{L},{res['mem']:.6g},n/a,n/a,{cfg},cpu,{tver},{tv},{commit}")
                    table[(enc, mode, L, prov)] = res
                    print(f"{enc:5s} {mode:8s} L={L:5d} {prov:10s} {res['p50']:10.2f} ms  +{res['mem']:8.1f} MiB", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".csv", "w") as f:
        f.write(HEADER + "\n" + "\n".join(rows) + "\n")
    md = ["# backend='cpu' (C++ extension) vs the PyTorch reference on CPU", "",
          f"batch 1, 4 heads, headdim 64, fp32, causal; {torch.get_num_threads()} threads; torch {tver}; commit {commit}.",
          "Time: median of the runs (ms). Memory: extra peak RSS of the call (MiB, ru_maxrss in a fresh process).", "",
          "| encoding | mode | seqlen | cpu ms | reference ms | speedup | cpu MiB | reference MiB |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for enc in args.encodings:
        for mode in args.modes:
            for L in args.seqlens:
                a, b = table.get((enc, mode, L, "native-cpu")), table.get((enc, mode, L, "reference"))
                if a is None or b is None:
                    continue
                md.append(f"| {enc} | {mode} | {L} | {a['p50']:.1f} | {b['p50']:.1f} | {b['p50'] / a['p50']:.2f}x | "
                          f"{a['mem']:.1f} | {b['mem']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.csv and {args.out}.md")


if __name__ == "__main__":
    main()
