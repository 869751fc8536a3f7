"""Attention forward: one online-softmax core, the encoding selected by constexpr hooks."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .hooks import (ENC_ALIBI, causal_key_end, head_layout, load_encoded, part_dots, positions, program_ids, scores_log2,
                    visible)
from .plan import Plan, interpreter
from .tuning import configs, pruner


@triton.autotune(configs=configs("fwd", ("BLOCK_M", "BLOCK_N")), prune_configs_by=pruner("fwd", ("BLOCK_M", "BLOCK_N")),
                 key=["BLOCK_P1", "BLOCK_P2", "BLOCK_DV", "ENC", "CAUSAL", "ROTATE_K",
                                             "DEFAULT_POS", "GATHER", "DTYPE_KEY"])
@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, IDX1, IDX2,
    FREQ, FSCALE, TC, TS, SLOPES,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_qpos_b, stride_kpos_b, stride_slope_b, stride_tab_b, stride_tab_t,
    LQ, LK, H, KV_GROUP, K_GROUP, TAB_GROUP, P1, P2, DV, q_pos_offset,
    scale, phase, alpha, BOUNDS, stride_bounds_b, N_BOUNDS,
    ENC: tl.constexpr, CAUSAL: tl.constexpr, DEFAULT_POS: tl.constexpr, GATHER: tl.constexpr,
    ROTATE_K: tl.constexpr, PREC: tl.constexpr, DTYPE_KEY: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bh = program_ids(LQ, BLOCK_M)
    i_b = pid_bh // H
    i_h = pid_bh % H
    i_b64 = i_b.to(tl.int64)
    p_q = Q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k = K + i_b64 * stride_kb + (i_h // K_GROUP).to(tl.int64) * stride_kh
    p_v = V + i_b64 * stride_vb + (i_h // KV_GROUP).to(tl.int64) * stride_vh

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < LQ
    o_p1, m_p1, o_p2, m_p2, o_d1, o_d2, o_dv, m_dv = head_layout(IDX1, IDX2, P1, P2, DV, GATHER, BLOCK_P1, BLOCK_P2,
                                                                 BLOCK_DV)

    pos_m = positions(QPOS + i_b64 * stride_qpos_b, o_m, m_m, q_pos_offset, DEFAULT_POS)
    # the query tile is encoded once
    p_tc = TC + i_b64 * stride_tab_b
    p_ts = TS + i_b64 * stride_tab_b
    b_q1, b_q2 = load_encoded(p_q, o_m, m_m, o_d1, m_p1, o_d2, m_p2, stride_qt, stride_qd, pos_m, i_h,
                              FREQ, FSCALE, p_tc, p_ts, stride_tab_t, TAB_GROUP, o_p1, m_p1, P1, ENC, True)
    slope = 0.0
    if ENC == ENC_ALIBI:
        slope = tl.load(SLOPES + i_b * stride_slope_b + i_h)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    hi = LK
    if CAUSAL and DEFAULT_POS:
        # keys n <= largest query position of this block
        hi = tl.minimum(LK, tl.maximum((pid_m + 1) * BLOCK_M + q_pos_offset, 0))
    if CAUSAL and not DEFAULT_POS:
        hi = causal_key_end(BOUNDS + i_b64 * stride_bounds_b, pid_m, N_BOUNDS, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < LK
        pos_n = positions(KPOS + i_b64 * stride_kpos_b, o_n, m_n, 0, DEFAULT_POS)
        # rotating keys inline is only offered for RoPE/HoPE (FoPE keys are always pre-rotated)
        b_k1, b_k2 = load_encoded(p_k, o_n, m_n, o_d1, m_p1, o_d2, m_p2, stride_kt, stride_kd, pos_n, i_h,
                                  FREQ, FSCALE, p_tc, p_ts, stride_tab_t, TAB_GROUP, o_p1, m_p1, P1, ENC, ROTATE_K)
        b_d1, b_d2 = part_dots(b_q1, b_q2, b_k1, b_k2, ENC, PREC)
        b_s = scores_log2(b_d1, b_d2, pos_m, pos_n, scale, slope, phase, alpha, ENC, FAST)  # [BM, BN]
        b_s = tl.where(visible(pos_m, pos_n, m_m, m_n, CAUSAL), b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows that saw no key yet
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_alpha = tl.exp2(b_m - b_m_use)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(p_v + o_n[:, None].to(tl.int64) * stride_vt + o_dv[None, :] * stride_vd,
                      mask=m_n[:, None] & m_dv[None, :], other=0.0)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PREC)
        b_m = b_m_new

    m_row = b_l > 0
    b_o = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    # log2-domain log-sum-exp; +inf for rows that see no key, so the backward's p = 2^(s - lse) is 0
    b_lse = tl.where(m_row, b_m + tl.log2(tl.where(m_row, b_l, 1.0)), float("inf"))
    p_o = O + i_b64 * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_ot + o_dv[None, :] * stride_od, b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & m_dv[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + o_m, b_lse, mask=m_m)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full fp32 products (as PyTorch's fp32 matmul does); halves use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def enc_args(plan: Plan, tables):
    """Encoding pointers of a kernel call; ``tables``: the FoPE ``(cos, sin)`` tables of the rows the
    kernel rotates, each ``(Bt, rows, Ht, P)`` float32 (``None`` otherwise)."""
    tc, ts = tables if tables is not None else (plan.fscale, plan.fscale)  # float32 placeholders
    return (plan.turns, plan.fscale, tc, ts, plan.slopes)


def table_strides(plan: Plan, tables, nheads: int):
    """``(stride_b, stride_t, group)`` of FoPE tables: query head ``h`` reads table head ``h // group``."""
    if tables is None:
        return 0, 0, 1
    tc = tables[0]
    return (tc.stride(0) if tc.shape[0] > 1 else 0), tc.stride(1), nheads // tc.shape[2]


def bounds_args(t: torch.Tensor, used: bool):
    """``(pointer, batch stride, chunks)`` of a causal-bounds tensor (``bounds.py``), or of a placeholder."""
    if not used:
        return t, 0, 0
    return t, (t.stride(0) if t.shape[0] > 1 else 0), t.shape[1]


def attn_fwd(q, k, v, q_pos, k_pos, plan: Plan, causal: bool, default_pos: bool, rotate_k: bool, q_tables=None,
             bounds=None):
    """Launch the forward kernel.

    q: (B, Lq, H, D); k: (B, Lk, Hk, D) (raw, or pre-rotated when ``rotate_k`` is False);
    v: (B, Lk, Hkv, Dv); q_pos/k_pos: (Bp, L) int64; ``bounds``: ``bounds.causal_bounds`` of the positions
    (causal with caller-given positions; else ``None``). Returns ``out (B, Lq, H, Dv)``, ``lse (B, H, Lq)``
    (float32, log2 domain).
    """
    b, lq, h, _ = q.shape
    lk, hkv, dv = v.shape[1], v.shape[2], v.shape[3]
    out = torch.empty(b, lq, h, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)

    tab_b, tab_t, tab_group = table_strides(plan, q_tables, h)
    kend = plan.idx1 if bounds is None else bounds[0]
    attn_fwd_kernel[grid](
        q, k, v, out, lse, q_pos, k_pos, plan.idx1, plan.idx2, *enc_args(plan, q_tables),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_pos.stride(0) if q_pos.shape[0] > 1 else 0, k_pos.stride(0) if k_pos.shape[0] > 1 else 0,
        plan.slope_stride_b, tab_b, tab_t,
        lq, lk, h, h // hkv, h // k.shape[2], tab_group, plan.p1, plan.p2, dv, lk - lq,
        plan.scale, plan.phase, plan.alpha, *bounds_args(kend, bounds is not None),
        ENC=plan.enc, CAUSAL=causal, DEFAULT_POS=default_pos, GATHER=plan.gather, ROTATE_K=rotate_k,
        PREC=dot_precision(q.dtype), DTYPE_KEY=str(q.dtype), FAST=not interpreter(),
        BLOCK_P1=plan.block_p1, BLOCK_P2=plan.block_p2, BLOCK_DV=triton.next_power_of_2(max(dv, 16)),
    )
    return out, lse


LN2 = math.log(2.0)
