"""Rotation tables and pre-rotation: a rotation encoding as per-row float32 ``cos``/``sin`` tables, and the
streaming operand of a kernel rotated once per call.

Every kernel reads a rotation from tables ``(Bt, rows, Ht, P)``: FoPE's Fourier sums (``autograd.fope_tables``),
or RoPE/HoPE's ``scale_j cos(angle_j)``, ``scale_j sin(angle_j)`` built here once per call for the rows'
positions (``rope_table_kernel``: one exact angle per (row, pair), shared by every head, where the kernels used to
evaluate a sin and a cos per (row, head, pair) and per tile). The attention kernels rotate their stationary tile
(q in the forward and dq kernels, k in the dk/dv kernel) as they load it; the streaming side is rotated once here
into an O(seqlen) buffer in the input dtype and the kernels' order (every pair's two elements in the buffer's two
halves, so a tile is one contiguous load for one product), one program per block of rows for all heads (the tables
are read once for all of them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hooks import TURN_2POW32, load_parts, part_offsets, program_ids, rotate, rotation_tables, store_part
from .fwd import table_strides
from .plan import Plan, launcher


@triton.jit
def rope_table_kernel(POS, FREQ, FSCALE, TC, TS, stride_pos_b, T, P, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows ``[BT]`` of batch row ``program_id(1)``: ``TC[b, t, p] = FSCALE[p] cos(angle)``, ``TS = ... sin``.

    ``FREQ``: the pairs' frequencies as 64-bit turn fractions ``F_p`` (int64, ``encodings/angles.py``): ``pos * F_p
    mod 2^64`` is exact in wrapping int64 arithmetic, its top 32 bits are the angle in turns, ``[-1/2, 1/2)``, with an
    error of at most ``|pos| 2^-65 + 2^-32`` turns at any position in ``[-2^30, 2^30)``."""
    pid_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    pos = tl.load(POS + i_b * stride_pos_b + o_t, mask=m_t, other=0).to(tl.int32)
    turns = tl.load(FREQ + o_p, mask=m_p, other=0)  # [BP] int64
    scale = tl.load(FSCALE + o_p, mask=m_p, other=0.0)
    frac = ((pos.to(tl.int64)[:, None] * turns[None, :]) >> 32).to(tl.int32)  # [BT, BP] turns * 2^32
    ang = frac.to(tl.float32) * TURN_2POW32  # [-pi, pi)
    o_tab = (i_b * T + o_t[:, None].to(tl.int64)) * P + o_p[None, :]
    m_tab = m_t[:, None] & m_p[None, :]
    tl.store(TC + o_tab, tl.cos(ang) * scale[None, :], mask=m_tab)
    tl.store(TS + o_tab, tl.sin(ang) * scale[None, :], mask=m_tab)


@triton.jit
def rotate_fwd_kernel(
    X, Y, IDX1, IDX2, TC, TS,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh,
    stride_tab_b, stride_tab_t, T, H_OUT, X_GROUP, TABLE_HEAD_STEP, TAB_GROUP, P,
    ONE_TABLE: tl.constexpr, GATHER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Rows ``[BT]`` of one batch row, every output head: the tables are read once per program when all heads
    share them (``ONE_TABLE``: RoPE/HoPE, FoPE with one coefficient head), else per head."""
    pid_t, i_b = program_ids(T, BLOCK_T)
    i_b = i_b.to(tl.int64)
    o_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_p = tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_d1 = part_offsets(IDX1, o_p, m_p, 0, GATHER)
    o_d2 = part_offsets(IDX2, o_p, m_p, P, GATHER)
    p_tc = TC + i_b * stride_tab_b
    p_ts = TS + i_b * stride_tab_b
    if ONE_TABLE:
        b_cos, b_sin = rotation_tables(o_t, m_t, 0, p_tc, p_ts, stride_tab_t, 1, o_p, m_p, P)  # [BT, BP]
    for i_h in range(0, H_OUT):
        if not ONE_TABLE:
            b_cos, b_sin = rotation_tables(o_t, m_t, i_h * TABLE_HEAD_STEP, p_tc, p_ts, stride_tab_t, TAB_GROUP, o_p,
                                           m_p, P)
        p_x = X + i_b * stride_xb + (i_h // X_GROUP) * stride_xh
        b_x1, b_x2 = load_parts(p_x, o_t, m_t, o_d1, m_p, o_d2, m_p, stride_xt, stride_xd)
        b_y1, b_y2 = rotate(b_x1, b_x2, b_cos, b_sin)
        # the kernels' order: part 1 in [0, BP), part 2 in [BP, 2 BP), padding as zeros (hooks.stream_layout)
        p_y = Y + i_b * stride_yb + i_h * stride_yh
        store_part(p_y, b_y1.to(Y.dtype.element_ty), o_t, m_t, o_p, o_p < BLOCK_P, stride_yt, 1)
        store_part(p_y, b_y2.to(Y.dtype.element_ty), o_t, m_t, BLOCK_P + o_p, o_p < BLOCK_P, stride_yt, 1)


def rope_tables(plan: Plan, pos: torch.Tensor):
    """RoPE/HoPE ``(cos, sin)`` tables of rows at ``pos (Bp, L)`` int64: ``(Bp, L, 1, P)`` float32 each, the pairs'
    YaRN scale applied (one table head: every head shares them)."""
    bp, t = pos.shape
    tc = torch.empty(bp, t, 1, plan.p1, device=pos.device, dtype=torch.float32)
    ts = torch.empty_like(tc)
    block_t = 16 if t <= 16 else 64
    launcher(rope_table_kernel)[(triton.cdiv(t, block_t), bp)](
        pos, plan.turns, plan.fscale, tc, ts, pos.stride(0) if bp > 1 else 0, t, plan.p1,
        BLOCK_T=block_t, BLOCK_P=plan.block_p1)
    return tc, ts


def rotate_block_t(t: int, block_p: int) -> int:
    """Rows per program: 64, or 32 for head dim 256 (64 rows of it spill registers: scripts/triton_aot.py)."""
    return 16 if t <= 16 else 64 if block_p <= 64 else 32


def rotate_tensor(x: torch.Tensor, plan: Plan, heads_out: int, tables, nheads: int = 0) -> torch.Tensor:
    """Rotate ``x (B, T, Hx, D)`` into a new ``(B, T, heads_out, 2 BP)`` tensor in x's dtype (``BP`` = the pairs
    padded to a power of two), with ``tables`` ``(cos, sin)`` ``(Bt, T, Ht, P)`` float32 of its rows
    (``rope_tables``, ``fope_tables``). The head is stored in the kernels' order, every pair's first element in
    ``[0, BP)`` and its second in ``[BP, 2 BP)`` whatever x's layout (half, interleaved, partial), padding zeroed: a
    kernel reads a row as one contiguous tile for one product (``hooks.stream_layout``).

    Output head ``h`` reads input head ``h // (heads_out // Hx)`` and uses the tables of query head
    ``h * (nheads // heads_out)`` (the first query head of its group when ``heads_out`` counts kv heads).
    """
    b, t, hx, d = x.shape
    nheads = max(nheads, heads_out)
    tab_b, tab_t, tab_group = table_strides(plan, tables, nheads)
    y = torch.empty(b, t, heads_out, 2 * plan.block_p1, device=x.device, dtype=x.dtype)
    block_t = rotate_block_t(t, plan.block_p1)
    grid = (triton.cdiv(t, block_t) * b,)
    launcher(rotate_fwd_kernel)[grid](
        x, y, plan.idx1, plan.idx2, tables[0], tables[1],
        *x.stride(), *y.stride()[:3], tab_b, tab_t,
        t, heads_out, heads_out // hx, nheads // heads_out, tab_group, plan.p1,
        ONE_TABLE=tables[0].shape[2] == 1, GATHER=plan.gather, BLOCK_T=block_t, BLOCK_P=plan.block_p1,
    )
    return y
