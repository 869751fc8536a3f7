"""Decoding with a KV cache and packed variable-length batches, against what a user would run instead.

decode: one new token per batch row attends to a cache of ``L`` tokens (batch 4, 16 query heads, 4 kv heads,
headdim 64; CPU: fp32, CUDA: bf16). Providers, each timed per decode step (write the new key/value, attend):
  * ``fused-kvcache``: ``fused_attention_with_kvcache`` with a cache of raw keys (encoded inside the kernel);
  * ``rotate+sdpa``: RoPE only: rotate the new key once (``apply_rotary``), write it into a cache of encoded keys,
    then ``scaled_dot_product_attention`` over the valid prefix (what an HF-style decoder does).
varlen: packed documents of random lengths (mean ``L/4``) filling ``L`` tokens, causal, fwd and fwd+bwd:
  * ``fused-varlen``: ``fused_attention_varlen``;
  * ``loop-rotate+sdpa``: per document, ``apply_rotary`` on q and k, then SDPA (causal).

    python benchmarks/bench_sequences.py [--what decode varlen] [--lengths 1024 4096 16384] [--repeats 20]
        [--encodings rope fope alibi tapa] [--device cpu|cuda] [--out benchmarks/results/sequences_cpu]

Writes ``<out>.csv`` (the harness's long format) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fused_posenc import apply_rotary, fused_attention_varlen, fused_attention_with_kvcache  # noqa: E402
from fused_posenc.bench import environment  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from long_format import md_table, write_csv  # noqa: E402

def _timed(fn, repeats: int, device) -> tuple:
    """(p50, p20, p80) milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def fwd_bwd(fn, grad: bool):
    """``fn()``, and with ``grad`` the backward of its sum too, as one callable to time."""
    def run():
        out = fn()
        if grad:
            out.sum().backward()
    return run


def bench_decode(lengths, encodings, repeats, device, dtype):
    b, h, hkv, d = 4, 16, 4, 64
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(0)
        k_cache = torch.randn(b, n, hkv, d, generator=g).to(device, dtype)
        v_cache = torch.randn(b, n, hkv, d, generator=g).to(device, dtype)
        q, k1 = torch.randn(b, 1, h, d, generator=g).to(device, dtype), torch.randn(b, 1, hkv, d, generator=g)
        k1, v1 = k1.to(device, dtype), torch.randn(b, 1, hkv, d, generator=g).to(device, dtype)
        lens = torch.full((b,), n - 1, dtype=torch.int32, device=device)  # the new token takes the last row
        config = f"batch={b},nheads={h},nheads_kv={hkv},headdim={d},dtype={str(dtype)[6:]},cache={n}"
        with torch.no_grad():
            for enc in encodings:
                t = _timed(lambda: fused_attention_with_kvcache(q, k_cache, v_cache, lens, k1, v1, enc), repeats,
                           device)
                rows.append((enc, "fused-kvcache", "decode", n, t, config))
            if "rope" in encodings:
                pos = torch.tensor([n - 1], device=device)
                enc_cache = k_cache.clone()

                def baseline():
                    qr = apply_rotary(q, "rope", pos)
                    enc_cache[:, n - 1:n] = apply_rotary(k1, "rope", pos)
                    v_cache[:, n - 1:n] = v1
                    return F.scaled_dot_product_attention(qr.transpose(1, 2), enc_cache.transpose(1, 2),
                                                          v_cache.transpose(1, 2), enable_gqa=True)

                rows.append(("rope", "rotate+sdpa", "decode", n, _timed(baseline, repeats, device), config))
        print(f"decode cache={n}: " + ", ".join(f"{r[0]}/{r[1]} {r[4][0]:.3f} ms" for r in rows if r[3] == n),
              flush=True)
    return rows


def bench_varlen(lengths, encodings, repeats, device, dtype):
    h, hkv, d = 8, 2, 64
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(1)
        docs = []
        while sum(docs) < n:
            docs.append(int(torch.randint(max(1, n // 8), max(2, 3 * n // 8), (1,), generator=g)))
        docs[-1] -= sum(docs) - n
        cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32, device=device)
        config = f"docs={len(docs)},nheads={h},nheads_kv={hkv},headdim={d},dtype={str(dtype)[6:]},causal=True"
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(n, hh, d, generator=g).to(device, dtype).requires_grad_(grad)
                       for hh in (h, hkv, hkv))

            def step(fn):
                return fwd_bwd(fn, grad)

            for enc in encodings:
                t = _timed(step(lambda: fused_attention_varlen(q, k, v, cu, cu, max(docs), max(docs), enc,
                                                               causal=True)), repeats, device)
                rows.append((enc, "fused-varlen", mode, n, t, config))
            if "rope" in encodings:
                bounds = cu.tolist()

                def loop():
                    outs = []
                    for a, b in zip(bounds[:-1], bounds[1:]):
                        qs, ks = apply_rotary(q[None, a:b], "rope"), apply_rotary(k[None, a:b], "rope")
                        outs.append(F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2),
                                                                   v[None, a:b].transpose(1, 2), is_causal=True,
                                                                   enable_gqa=True)[0].transpose(0, 1))
                    return torch.cat(outs)

                rows.append(("rope", "loop-rotate+sdpa", mode, n, _timed(step(loop), repeats, device), config))
        print(f"varlen tokens={n}: " + ", ".join(f"{r[0]}/{r[1]}/{r[2]} {r[4][0]:.2f} ms" for r in rows if r[3] == n),
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", nargs="+", default=["decode", "varlen"], choices=["decode", "varlen"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--varlen-lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    ap.add_argument("--encodings", nargs="+", default=["rope", "fope", "alibi", "tapa"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"sequences_{device.type}")
    env = environment(args.device)
    rows = []
    if "decode" in args.what:
        rows += bench_decode(args.lengths, args.encodings, args.repeats, device, dtype)
    if "varlen" in args.what:
        rows += bench_varlen(args.varlen_lengths, args.encodings, args.repeats, device, dtype)
    gpu = env.get("gpu", "cpu")
    write_csv(out + ".csv", rows, env)
    with open(out + ".md", "w") as f:
        f.write(f"# Decoding and packed batches on {gpu}\n\n`python benchmarks/bench_sequences.py "
                f"{' '.join(sys.argv[1:])}`; torch {env.get('torch')}, triton {env.get('triton')}, commit "
                f"{env.get('commit')}. Median of {args.repeats} calls (ms); p20-p80 in the CSV.\n\n")
        for what in ("decode", "fwd", "fwd+bwd"):
            sel = [r for r in rows if r[2] == what]
            if sel:
                title = "decode step, one token per row (cache length)" if what == "decode" else f"varlen {what} (tokens)"
                f.write(md_table(sel, title, baselines=("rotate+sdpa", "loop-rotate+sdpa")))
    print(f"wrote {out}.csv and {out}.md")


if __name__ == "__main__":
    main()
