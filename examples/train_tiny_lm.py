"""Train fused_posenc's tiny LM on a synthetic copy task generated on the fly, with any encoding.

    python examples/train_tiny_lm.py --encoding fope --steps 200
    python examples/train_tiny_lm.py --encoding tapa --device cuda --compile

Each step draws a fresh batch of ``[random tokens] [separator] [the same tokens]`` and trains on the
cross-entropy of the copied half (only attention to the right earlier position can predict it). A tqdm bar
shows the loss; the loss curve is written as CSV (step, loss, seconds).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fused_posenc.encodings import NAMES  # noqa: E402
from fused_posenc.nn import TinyLM  # noqa: E402
from fused_posenc.nn.data import copy_task_batch, copy_task_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoding", default="rope", choices=list(NAMES))
    p.add_argument("--fope-learnable", action="store_true", help="train FoPE's Fourier coefficients too")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--half-len", type=int, default=16, help="tokens to copy (sequence length 2 * half_len + 1)")
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="fused_attention backend (auto, triton, cuda, cpu, torch)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default="tiny_lm_loss.csv", help="where to write the loss curve")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                   num_kv_heads=args.kv_heads, encoding=args.encoding, fope_learnable=args.fope_learnable,
                   fope_train_len=2 * args.half_len + 1, backend=args.backend).to(args.device)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{args.encoding} ({sum(p.numel() for p in model.parameters())} params)")
    for step in bar:
        tokens = copy_task_batch(args.vocab, args.batch, args.half_len, gen, args.device)
        loss = copy_task_loss(step_model, tokens, args.half_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append((step, loss.item(), time.perf_counter() - t0))
        bar.set_postfix(loss=f"{rows[-1][1]:.3f}")
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "seconds"])
        w.writerows((s, f"{l:.6f}", f"{t:.3f}") for s, l, t in rows)
    first = sum(r[1] for r in rows[:5]) / min(5, len(rows))
    last = sum(r[1] for r in rows[-5:]) / min(5, len(rows))
    print(f"{args.encoding}: copy loss {first:.3f} -> {last:.3f} in {args.steps} steps "
          f"({rows[-1][2]:.1f} s on {args.device}); curve: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
