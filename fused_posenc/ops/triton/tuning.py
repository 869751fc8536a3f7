"""Autotuning spaces, keyed on head dim (the padded part widths), dtype and encoding.

``FUSED_POSENC_AUTOTUNE=0`` keeps only the first config of each pruned space (fast compiles for
test suites); the interpreter always runs one small config.
"""
from __future__ import annotations

import os

import triton

from .plan import ENC_CODES, interpreter

# (stationary block, streaming block, warps, stages), best-first guesses per head-dim class
_FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    256: [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],  # (64, 64, 8 warps) first gave each warp 8 rows
}
# backward, one table per kernel: (stationary, streaming, warps, stages); dq keeps queries stationary, dk/dv keeps
# keys stationary, and in both the stationary block is the rows of the score tiles and of the accumulators. Every
# half-precision config gives each warp >= 16 rows of every chained dot (ROWS_PER_WARP below, the Triton tutorial's
# rule): the old first config (64, 64, 8 warps) gave 8, so both warpgroups issued the same wgmma
# and exp2 (benchmarks/results/static_sm90.md: 32 exp2 per thread per tile where 16 are needed). Static evidence
# only (no GPU timing yet): scripts/triton_aot.py --sass, the before/after table in static_sm90.md.
_DQ = {
    64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
    128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 16, 4, 2)],
}
# dk/dv works on S^T = K Q^T (keys as rows, bwd.py): (key block, query block, warps, stages). Chosen by the static
# sm_90 report (benchmarks/results/static_sm90_dkdv.md: interior-loop instructions per score, local memory)
_DKDV = {
    64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
    128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(64, 64, 4, 2), (128, 32, 8, 1), (64, 32, 4, 2), (64, 16, 4, 2)],
}
# TAPA's dk/dv loop holds about seven score-sized tiles beside the dK/dV accumulators: 32-query tiles keep it out of
# local memory (d128: 175/130 LDL/STL per tile at 64 x 64 before the transposed form, 1/0 at 128 x 32)
_DKDV_TAPA = {
    64: [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
    128: [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
    256: [(128, 32, 8, 1), (64, 32, 4, 2), (64, 64, 4, 2), (64, 16, 4, 2)],
}
ENC_TAPA = ENC_CODES["tapa"]  # the kernels' ENC of TAPA
# the rows of the kernels' score tiles and accumulators, as an index into a config tuple: the stationary block in
# every kernel (queries in the forward and dq kernels; keys in the dk/dv kernel, which works on S^T = K Q^T, so its
# streaming query block is only a column count and may be small)
_ROWS = {"fwd": (0,), "dq": (0,), "dkdv": (0,)}
ROWS_PER_WARP = 16
_TABLES = {"fwd": _FWD, "dq": _DQ, "dkdv": _DKDV}
_ENC_TABLES = {("dkdv", ENC_TAPA): _DKDV_TAPA}  # (kernel, encoding) -> its own table
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
    """All configs an autotuner of ``kind`` (``"fwd"``, ``"dq"``, ``"dkdv"``) may see (the pruner picks the ones for
    the call's head dim and dtype)."""
    if interpreter():
        return [triton.Config({names[0]: 16, names[1]: 16}, num_warps=4, num_stages=1)]
    seen, out = set(), []
    extra = [t for (k, _), t in _ENC_TABLES.items() if k == kind]
    for cfgs in [c for table in [_TABLES[kind], *extra, _FP32] for c in table.values()]:
        for c in cfgs:
            if c not in seen:
                seen.add(c)
                out.append(_tag(c, names))
    return out


def enough_rows(kind: str, cfg) -> bool:
    """Whether every warp of a half-precision config gets >= ROWS_PER_WARP rows of each chained dot (fewer: the
    warpgroups duplicate each other's wgmma and exp2). fp32 dots run on the FMA units and are exempt."""
    return all(cfg[i] >= ROWS_PER_WARP * cfg[2] for i in _ROWS[kind])


def pruner(kind: str, names):
    def prune(configs_, named_args, **kwargs):
        if interpreter():
            return configs_
        meta = {**named_args, **kwargs}
        width = meta["BLOCK_P1"] + (0 if meta.get("ONE_DOT", False) else meta["BLOCK_P2"])
        width = max(width, meta.get("BLOCK_DV", width))
        klass = 64 if width <= 64 else 128 if width <= 128 else 256
        fp32 = meta["DTYPE_KEY"] == "torch.float32"
        wanted = (_FP32 if fp32 else _ENC_TABLES.get((kind, meta.get("ENC")), _TABLES[kind]))[klass]
        keep = []
        for c in wanted:
            if not fp32 and not enough_rows(kind, c):
                continue
            for cfg in configs_:
                if (cfg.kwargs[names[0]], cfg.kwargs[names[1]], cfg.num_warps, cfg.num_stages) == c:
                    keep.append(cfg)
                    break
        if os.environ.get("FUSED_POSENC_AUTOTUNE", "1") == "0":
            keep = keep[:1]
        return keep or configs_[:1]

    return {"early_config_prune": prune}
