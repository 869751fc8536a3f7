"""Sliding-window attention: time against sequence length at a fixed window, against what a user would run
instead.

Causal attention, batch 1, 8 query heads, 2 kv heads, headdim 64 (CPU: fp32, CUDA: bf16), window ``W`` (keys
``q_pos - W < k_pos <= q_pos``, Mistral's rule). Providers, forward and forward + backward:
  * ``fused-window``: ``fused_attention(..., causal=True, window_size=(W - 1, -1))`` (tiles outside the window
    skipped: the cost should grow like ``L * W``);
  * ``fused-causal``: the same call without a window (grows like ``L^2 / 2``);
  * ``rotate+sdpa-mask``: RoPE only: ``apply_rotary`` on q and k, then ``scaled_dot_product_attention`` with the
    boolean sliding-window mask (what a user without a windowed kernel writes: ``L^2`` work and memory).

    python benchmarks/bench_window.py [--lengths 1024 2048 4096 8192] [--window 256] [--repeats 5]
        [--encodings rope alibi] [--device cpu|cuda] [--out benchmarks/results/window_cpu]

Writes ``<out>.csv`` (the harness's long format) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sequences import _timed, fwd_bwd  # noqa: E402
from long_format import md_table, write_csv  # noqa: E402
from fused_posenc import apply_rotary, fused_attention  # noqa: E402
from fused_posenc.bench import environment  # noqa: E402


def bench(lengths, window, encodings, repeats, device, dtype, modes):
    h, hkv, d = 8, 2, 64
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(0)
        config = f"batch=1,nheads={h},nheads_kv={hkv},headdim={d},dtype={str(dtype)[6:]},causal=True,window={window}"
        for mode in modes:
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(1, n, hh, d, generator=g).to(device, dtype).requires_grad_(grad)
                       for hh in (h, hkv, hkv))

            def step(fn):
                return fwd_bwd(fn, grad)

            for enc in encodings:
                for prov, ws in (("fused-window", (window - 1, -1)), ("fused-causal", (-1, -1))):
                    t = _timed(step(lambda: fused_attention(q, k, v, enc, causal=True, window_size=ws)), repeats,
                               device)
                    rows.append((enc, prov, mode, n, t, config))
            if "rope" in encodings:
                i = torch.arange(n, device=device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (L, L)

                def masked():
                    qr, kr = apply_rotary(q, "rope"), apply_rotary(k, "rope")
                    return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                                          attn_mask=mask, enable_gqa=True).transpose(1, 2)

                rows.append(("rope", "rotate+sdpa-mask", mode, n, _timed(step(masked), repeats, device), config))
            print(f"L={n} {mode}: " + ", ".join(f"{r[0]}/{r[1]} {r[4][0]:.2f} ms" for r in rows
                                                if r[3] == n and r[2] == mode), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--encodings", nargs="+", default=["rope", "alibi"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"window_{device.type}")
    env = environment(args.device)
    rows = bench(args.lengths, args.window, args.encodings, args.repeats, device, dtype, args.modes)
    gpu = env.get("gpu", "cpu")
    write_csv(out + ".csv", rows, env)
    with open(out + ".md", "w") as f:
        f.write(f"# Sliding window {args.window} on {gpu}\n\n`python benchmarks/bench_window.py "
                f"{' '.join(sys.argv[1:])}`; torch {env.get('torch')}, triton {env.get('triton')}, commit "
                f"{env.get('commit')}. Median of {args.repeats} calls (ms); p20-p80 in the CSV. Causal, batch 1, "
                "8 heads (2 kv), headdim 64.\n\n")
        for mode in args.modes:
            f.write(md_table([r for r in rows if r[2] == mode], f"{mode} (sequence length)",
                             baselines=("rotate+sdpa-mask",), digits=2))
    print(f"wrote {out}.csv and {out}.md")


if __name__ == "__main__":
    main()
