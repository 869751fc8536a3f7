"""Pre-rotation: apply a rotation encoding to a whole tensor once (the streaming side of a kernel).

The attention kernels rotate their stationary tile (q in the forward and dq kernels, k in the
dk/dv kernel) as they load it. The streaming side is either rotated per tile inside the loop or,
when that costs more than a pass over memory (always for FoPE, whose tables are small matmuls),
rotated once here into an O(seqlen) buffer in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hooks import load_encoded, part_offsets, positions, program_ids, store_part
from .fwd import table_strides
from .plan import Plan


@triton.jit
def rotate_fwd_kernel(
    X, Y, POS, IDX1, IDX2, FREQ, FSCALE, TC, TS,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    stride_pos_b, stride_tab_b, stride_tab_t, T, H_OUT, X_GROUP, TABLE_HEAD_STEP, TAB_GROUP, P, pos_offset,
    ENC: tl.constexpr, DEFAULT_POS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_t, pid_bh = program_ids(T, BLOCK_T)
    i_b = (pid_bh // H_OUT).to(tl.int64)
    i_h = pid_bh % H_OUT
    o_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_d1 = part_offsets(IDX1, o_p, m_p, 0, GATHER)
    o_d2 = part_offsets(IDX2, o_p, m_p, P, GATHER)
    pos = positions(POS + i_b * stride_pos_b, o_t, m_t, pos_offset, DEFAULT_POS)
    p_x = X + i_b * stride_xb + (i_h // X_GROUP).to(tl.int64) * stride_xh
    b_y1, b_y2 = load_encoded(p_x, o_t, m_t, o_d1, m_p, o_d2, m_p, stride_xt, stride_xd, pos, i_h * TABLE_HEAD_STEP,
                              FREQ, FSCALE, TC + i_b * stride_tab_b, TS + i_b * stride_tab_b, stride_tab_t, TAB_GROUP,
                              o_p, m_p, P, ENC, True)
    p_y = Y + i_b * stride_yb + i_h.to(tl.int64) * stride_yh
    store_part(p_y, b_y1, o_t, m_t, o_d1, m_p, stride_yt, stride_yd)
    store_part(p_y, b_y2, o_t, m_t, o_d2, m_p, stride_yt, stride_yd)


def rotate_block_t(t: int, block_p: int) -> int:
    """Rows per program: 64, or 32 for head dim 256 (64 rows of it spill registers: scripts/triton_aot.py)."""
    return 16 if t <= 16 else 64 if block_p <= 64 else 32


def rotate_tensor(x: torch.Tensor, pos: torch.Tensor, plan: Plan, heads_out: int, default_pos: bool,
                  pos_offset: int = 0, nheads: int = 0, tables=None) -> torch.Tensor:
    """Rotate ``x (B, T, Hx, D)`` into a new ``(B, T, heads_out, D)`` tensor in x's dtype.

    Output head ``h`` reads input head ``h // (heads_out // Hx)`` and uses the tables of query head
    ``h * (nheads // heads_out)`` (the first query head of its group when ``heads_out`` counts kv heads).
    """
    b, t, hx, d = x.shape
    nheads = max(nheads, heads_out)
    tab_b, tab_t, tab_group = table_strides(plan, tables, nheads)
    tc, ts = tables if tables is not None else (plan.fscale, plan.fscale)
    y = torch.empty(b, t, heads_out, d, device=x.device, dtype=x.dtype)
    block_t = rotate_block_t(t, plan.block_p1)
    grid = (triton.cdiv(t, block_t) * b * heads_out,)
    rotate_fwd_kernel[grid](
        x, y, pos, plan.idx1, plan.idx2, plan.turns, plan.fscale, tc, ts,
        *x.stride(), *y.stride(), pos.stride(0) if pos.shape[0] > 1 else 0, tab_b, tab_t,
        t, heads_out, heads_out // hx, nheads // heads_out, tab_group, plan.p1, pos_offset,
        ENC=plan.enc, DEFAULT_POS=default_pos, GATHER=plan.gather,
        BLOCK_T=block_t, BLOCK_P=plan.block_p1,
    )
    return y
