"""Quick GPU timing probe of the Triton kernels (design decisions; the full harness is benchmarks/).

Prints median ms and TFLOP/s (FlashAttention's formula) for fwd and fwd+bwd of every encoding,
both ways of rotating the streaming operand, and SDPA (flash) with a separate rotation.
Usage: python scripts/gpu_probe.py [--seqlens 1024,4096] [--csv out.csv]
"""
import argparse
import csv
import os

import torch
import torch.nn.functional as F
import triton

import fused_posenc as fp


def tflops(b, h, n, d, causal, mode, ms):
    f = 4 * b * h * n * n * d * (0.5 if causal else 1.0) * {"fwd": 1.0, "fwd+bwd": 3.5}[mode]
    return f / ms * 1e-9


def bench(fn, mode, inputs):
    def run():
        out = fn(*inputs)
        if mode == "fwd+bwd":
            out.backward(inputs[-1].new_ones(()).expand_as(out))
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,4096,8192")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    rows = []
    b_tokens, h, d = 16384, 16, 128
    for n in map(int, args.seqlens.split(",")):
        b = max(1, b_tokens // n)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        cases = []
        for enc in ["none", "rope", "hope", "fope", "alibi", "tapa"]:
            modes = ["pre", "inline"] if enc in ("rope", "hope") else ["pre"]
            for sm in modes:
                def f(q, k, v, enc=enc, sm=sm):
                    os.environ["FUSED_POSENC_ROTATE_STREAM"] = sm
                    return fp.fused_attention(q, k, v, enc, causal=True, backend="triton")
                cases.append((f"triton-{enc}-{sm}", f))

        def sdpa_rope(q, k, v):
            qr, kr = fp.apply_rotary(q, "rope"), fp.apply_rotary(k, "rope")
            return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

        def sdpa_none(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
        cases += [("sdpa-none", sdpa_none), ("torchrot+sdpa-rope", sdpa_rope)]
        for name, fn in cases:
            for mode in ["fwd", "fwd+bwd"]:
                try:
                    ms = bench(fn, mode, (q, k, v))
                except Exception as e:  # report, keep going
                    print(f"{name} {mode} n={n}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append(dict(name=name, mode=mode, seqlen=n, batch=b, ms=round(ms, 4),
                                 tflops=round(tflops(b, h, n, d, True, mode, ms), 1)))
                print(f"{name:28s} {mode:8s} n={n:6d} {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
