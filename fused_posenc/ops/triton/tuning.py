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
_BWD = {
    64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
    128: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
}
_FP32 = [(64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2)]


def _tag(cfg, names):
    a, b, w, s = cfg
    return triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)


def configs(kind: str, names):
    """All configs an autotuner may see (the pruner picks the ones for the call's head dim and dtype)."""
    if interpreter():
        return [triton.Config({names[0]: 16, names[1]: 16}, num_warps=4, num_stages=1)]
    table = _FWD if kind == "fwd" else _BWD
    seen, out = set(), []
    for cfgs in list(table.values()) + [_FP32]:
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
        wanted = _FP32 if meta["DTYPE_KEY"] == "torch.float32" else (_FWD if kind == "fwd" else _BWD)[klass]
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
