"""Autotuning spaces, keyed on head dim (the padded part widths), dtype and encoding.

``FUSED_POSENC_AUTOTUNE=0`` keeps only the first config of each pruned space (fast compiles for
test suites); the interpreter always runs one small config.
"""
from __future__ import annotations

import os

import triton

from .plan import interpreter

# (stationary block, streaming block, warps, stages), best-first guesses per head-dim class
_FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}
# backward, head dims 128/256: 8 warps first. Static evidence only (no GPU timing yet): ptxas reports
# 1-10 KB of register spills per thread for 4 warps on these tiles and ~0 for the 8-warp configs
# (scripts/triton_aot.py --ptxas, benchmarks/results/triton_aot_sm90.csv)
_BWD = {
    64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
    128: [(64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
    256: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2)],
}
# fp32 tiles are twice the bytes and fp32 dots run on FMAs, not tensor cores: smaller blocks, 8 warps first (the
# 4-warp configs spill 1-45 KB/thread under ptxas -v; head dim 256 with 64 x 32 overflows an H100's 227 KiB of
# shared memory in the backward with inline rotation), per scripts/triton_aot.py
_FP32 = {
    64: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
    128: [(32, 32, 8, 2), (64, 32, 8, 2), (16, 16, 4, 2), (32, 32, 4, 2)],
    256: [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2), (32, 16, 4, 2)],
}


def _tag(cfg, names):
    a, b, w, s = cfg
    return triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)


def configs(kind: str, names):
    """All configs an autotuner may see (the pruner picks the ones for the call's head dim and dtype)."""
    if interpreter():
        return [triton.Config({names[0]: 16, names[1]: 16}, num_warps=4, num_stages=1)]
    table = _FWD if kind == "fwd" else _BWD
    seen, out = set(), []
    for cfgs in list(table.values()) + list(_FP32.values()):
        for c in cfgs:
            if c not in seen:
                seen.add(c)
                out.append(_tag(c, names))
    return out


def pruner(kind: str, names):
    def prune(configs_, named_args, **kwargs):
        if interpreter():
            return configs_
        meta = {**named_args, **kwargs}
        width = meta["BLOCK_P1"] + meta["BLOCK_P2"]
        width = max(width, meta.get("BLOCK_DV", width))
        klass = 64 if width <= 64 else 128 if width <= 128 else 256
        wanted = (_FP32 if meta["DTYPE_KEY"] == "torch.float32" else _FWD if kind == "fwd" else _BWD)[klass]
        keep = []
        for c in wanted:
            for cfg in configs_:
                if (cfg.kwargs[names[0]], cfg.kwargs[names[1]], cfg.num_warps, cfg.num_stages) == c:
                    keep.append(cfg)
                    break
        if os.environ.get("FUSED_POSENC_AUTOTUNE", "1") == "0":
            keep = keep[:1]
        return keep or configs_[:1]

    return {"early_config_prune": prune}
