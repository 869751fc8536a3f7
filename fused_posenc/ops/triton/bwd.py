"""Attention backward: delta = rowsum(dO * O), then a dk/dv kernel (key blocks stationary) and a dq
kernel (query blocks stationary). Both recompute the encoding; rotated-frame gradients are rotated
back with the transposed rotation; FoPE also emits per-row table gradients for its coefficients."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fwd import bounds_args, dot_precision, enc_args, mask_args, table_strides
from .hooks import (ENC_ALIBI, ENC_FOPE, ENC_ROTARY, ENC_TAPA, block_query_range, head_layout, join_parts,
                    key_span, key_stages, key_tile, load_parts, part_dots, positions, program_ids, rotate, rotate_back,
                    rotation_tables, score_grads, scores_log2, split_parts, stage_len, stage_start, stage_tiles,
                    store_part, stream_layout, tapa_omega, visible, visible_t)
from .plan import Plan, interpreter, launcher
from .tuning import configs, pruner


@triton.jit
def attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_od,
                               stride_dob, stride_dot, stride_doh, stride_dod, LQ, H, DV,
                               BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, pid_bh = program_ids(LQ, BLOCK_M)
    i_b = (pid_bh // H).to(tl.int64)
    i_h = (pid_bh % H).to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < LQ
    o_dv = tl.arange(0, BLOCK_DV)
    mask = m_m[:, None] & (o_dv < DV)[None, :]
    b_o = tl.load(O + i_b * stride_ob + i_h * stride_oh + o_m[:, None].to(tl.int64) * stride_ot + o_dv[None, :] * stride_od,
                  mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(DO + i_b * stride_dob + i_h * stride_doh + o_m[:, None].to(tl.int64) * stride_dot
                   + o_dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


_KEY = ["BLOCK_P1", "BLOCK_P2", "ONE_DOT", "BLOCK_DV", "ENC", "CAUSAL", "DEFAULT_POS", "GATHER", "HAS_KLEN",
        "KLEN_LEFT", "WINDOW", "SOFTCAP", "DTYPE_KEY"]


@triton.autotune(configs=configs("dkdv", ("BLOCK_N", "BLOCK_M")), prune_configs_by=pruner("dkdv", ("BLOCK_N", "BLOCK_M")),
                 key=_KEY)
@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, DCK, DSK, QPOS, KPOS, IDX1, IDX2, KLEN,
    TC, TS, SLOPES,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_qpos_b, stride_kpos_b, stride_slope_b, stride_tab_b, stride_tab_t,
    LQ, LK, H, HKV, Q_GROUP, TAB_GROUP, P1, P2, DV, q_pos_offset,
    scale, phase, alpha, BOUNDS, stride_bounds_b, N_BOUNDS, win_l, win_r, softcap,
    ENC: tl.constexpr, CAUSAL: tl.constexpr, DEFAULT_POS: tl.constexpr, GATHER: tl.constexpr, HAS_KLEN: tl.constexpr,
    KLEN_LEFT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, FOPE_GRAD: tl.constexpr,
    PREC: tl.constexpr, DTYPE_KEY: tl.constexpr, FAST: tl.constexpr, ONE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One block of keys of one kv head; loops over the query heads of its group and all query blocks.

    Q is the raw q, or for a rotation q pre-rotated per query head (``rotate.py``); K, V, DK, DV are per kv head.
    Keys past ``KLEN[b]`` (``HAS_KLEN``: key padding; ``KLEN_LEFT``: keys before ``LK - KLEN[b]``) take no part and
    get zero gradients.
    """
    pid_n, pid_bh = program_ids(LK, BLOCK_N)
    i_b = pid_bh // HKV
    i_hk = pid_bh % HKV
    i_b64 = i_b.to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_store = o_n < LK
    n_beg, n_end = key_span(KLEN, i_b, LK, HAS_KLEN, KLEN_LEFT)
    m_n = o_n < n_end
    if KLEN_LEFT:
        m_n = m_n & (o_n >= n_beg)
    o_p1, m_p1, o_p2, m_p2, o_d1, o_d2, o_dv, m_dv = head_layout(IDX1, IDX2, P1, P2, DV, GATHER, BLOCK_P1, BLOCK_P2,
                                                                 BLOCK_DV)
    ROTATION: tl.constexpr = (ENC == ENC_ROTARY) or (ENC == ENC_FOPE)
    # one product per tile: NoPE/ALiBi over the whole head, a rotation over its joined parts (hooks.stream_layout)
    ONE: tl.constexpr = ONE_DOT or ROTATION
    BLOCK_W1: tl.constexpr = BLOCK_P1 + BLOCK_P2 * ROTATION  # the width of part 1's products
    o_s1, m_s1, o_s2, m_s2 = stream_layout(o_d1, m_p1, o_d2, m_p2, ROTATION, BLOCK_P1, BLOCK_P2)

    pos_n = positions(KPOS + i_b64 * stride_kpos_b, o_n, m_n, 0, DEFAULT_POS)
    p_tc = TC + i_b64 * stride_tab_b
    p_ts = TS + i_b64 * stride_tab_b
    p_k = K + i_b64 * stride_kb + i_hk.to(tl.int64) * stride_kh
    b_k1, b_k2 = load_parts(p_k, o_n, m_n, o_d1, m_p1, o_d2, m_p2, stride_kt, stride_kd, ONE_DOT)  # [BN, BP*] raw
    b_v = tl.load(V + i_b64 * stride_vb + i_hk.to(tl.int64) * stride_vh + o_n[:, None].to(tl.int64) * stride_vt
                  + o_dv[None, :] * stride_vd, mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BN, BDV]

    b_dk1 = tl.zeros([BLOCK_N, BLOCK_P1], dtype=tl.float32)
    b_dk2 = tl.zeros([BLOCK_N, BLOCK_P2], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # the queries [lo, hi) that can see a key of this block (causal rule, window) and [f_lo, f_hi) that see all of
    # them: their tiles need no mask when every key of the block takes part
    lo, hi, f_lo, f_hi = block_query_range(BOUNDS + i_b64 * stride_bounds_b, pid_n, N_BOUNDS, LQ, q_pos_offset, win_l,
                                           win_r, CAUSAL, WINDOW, DEFAULT_POS, BLOCK_N, BLOCK_M)
    if HAS_KLEN:  # a block of padding keys: nothing to loop over
        lo = tl.where((pid_n * BLOCK_N < n_end) & ((pid_n + 1) * BLOCK_N > n_beg), lo, LQ)
    m_block = (pid_n * BLOCK_N >= n_beg) & ((pid_n + 1) * BLOCK_N <= n_end)  # every key of the block is valid
    n_tiles, t_a, t_b = stage_tiles(lo, hi, f_lo, tl.where(m_block, tl.minimum(f_hi, LQ), 0), BLOCK_M)
    for g in range(0, Q_GROUP):
        i_h = i_hk * Q_GROUP + g
        b_kr1 = b_k1
        b_kr2 = b_k2
        if ROTATION:
            b_cos, b_sin = rotation_tables(o_n, m_n, i_h, p_tc, p_ts, stride_tab_t, TAB_GROUP, o_p1, m_p1, P1)
            b_r1, b_r2 = rotate(b_k1, b_k2, b_cos, b_sin)
            b_kr1 = join_parts(b_r1.to(b_k1.dtype), b_r2.to(b_k2.dtype))  # [BN, BP1 + BP2]
        slope = 0.0
        if ENC == ENC_ALIBI:
            slope = tl.load(SLOPES + i_b * stride_slope_b + i_h)
        p_q = Q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
        p_do = DO + i_b64 * stride_dob + i_h.to(tl.int64) * stride_doh
        p_lse = LSE + (i_b64 * H + i_h) * LQ
        p_delta = DELTA + (i_b64 * H + i_h) * LQ
        b_dkr1 = tl.zeros([BLOCK_N, BLOCK_W1], dtype=tl.float32)
        b_dkr2 = tl.zeros([BLOCK_N, BLOCK_P2], dtype=tl.float32)
        # stage 0: interior query tiles (no mask), stage 1: the boundary ones (masked), as in the forward
        for stage in tl.static_range(2):
            for i_t in range(0, stage_len(stage, n_tiles, t_a, t_b)):
                o_m = stage_start(stage, i_t, lo, t_a, t_b, BLOCK_M) + tl.arange(0, BLOCK_M)
                m_m = o_m < LQ
                pos_m = positions(QPOS + i_b64 * stride_qpos_b, o_m, m_m, q_pos_offset, DEFAULT_POS)
                # queries as stored: raw, or rotated once per call (rotate.py)
                b_q1, b_q2 = load_parts(p_q, o_m, m_m, o_s1, m_s1, o_s2, m_s2, stride_qt, stride_qd, ONE)
                b_do = tl.load(p_do + o_m[:, None].to(tl.int64) * stride_dot + o_dv[None, :] * stride_dod,
                               mask=m_m[:, None] & m_dv[None, :], other=0.0)  # [BM, BDV]
                b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf"))
                b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
                # transposed tiles, keys as rows (the Triton tutorial's form): S^T = K Q^T, so P^T and dS^T feed
                # the dV and dK products as they are, with no transpose of a score tile through shared memory
                b_d1, b_d2 = part_dots(b_kr1, b_kr2, b_q1, b_q2, ENC, PREC, ONE)  # [BN, BM]
                b_om = 0.0
                if ENC == ENC_TAPA:
                    b_om = tapa_omega(pos_n, pos_m, phase, alpha, FAST)  # |m - n|: either orientation
                b_s, b_t = scores_log2(b_d1, b_d2, pos_n, pos_m, scale, slope, b_om, softcap, ENC, FAST, SOFTCAP)
                b_pt = tl.exp2(b_s - b_lse[None, :])  # [BN, BM]
                if stage == 1:
                    b_pt = tl.where(visible_t(pos_n, pos_m, m_n, m_m, CAUSAL, WINDOW, win_l, win_r), b_pt, 0.0)
                b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
                b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)  # [BN, BM]
                b_dst = b_pt * (b_dpt - b_delta[None, :])
                b_g1, b_g2 = score_grads(b_dst, b_t, b_d1, b_d2, b_om, scale, ENC, FAST, SOFTCAP)
                b_dkr1 = tl.dot(b_g1.to(b_q1.dtype), b_q1, b_dkr1, input_precision=PREC)
                if not ONE:
                    b_dkr2 = tl.dot(b_g2.to(b_q2.dtype), b_q2, b_dkr2, input_precision=PREC)
        if ROTATION:
            b_e1, b_e2 = split_parts(b_dkr1)  # the rotated-frame gradient's parts
            b_u1, b_u2 = rotate_back(b_e1, b_e2, b_cos, b_sin)
            b_dk1 += b_u1
            b_dk2 += b_u2
            if FOPE_GRAD:
                # table gradients of this head's keys: dC = g1 k1 + g2 k2, dS = g2 k1 - g1 k2
                b_kf1 = b_k1.to(tl.float32)
                b_kf2 = b_k2.to(tl.float32)
                o_tab = ((i_b64 * LK + o_n[:, None].to(tl.int64)) * H + i_h) * P1 + o_p1[None, :]
                m_tab = m_n[:, None] & m_p1[None, :]
                tl.store(DCK + o_tab, b_e1 * b_kf1 + b_e2 * b_kf2, mask=m_tab)
                tl.store(DSK + o_tab, b_e2 * b_kf1 - b_e1 * b_kf2, mask=m_tab)
        else:
            b_dk1 += b_dkr1
            b_dk2 += b_dkr2

    p_dk = DK + i_b64 * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    store_part(p_dk, b_dk1.to(DK.dtype.element_ty), o_n, m_store, o_d1, m_p1, stride_dkt, stride_dkd)
    if not ONE_DOT:
        store_part(p_dk, b_dk2.to(DK.dtype.element_ty), o_n, m_store, o_d2, m_p2, stride_dkt, stride_dkd)
    tl.store(DV_OUT + i_b64 * stride_dvb + i_hk.to(tl.int64) * stride_dvh + o_n[:, None].to(tl.int64) * stride_dvt
             + o_dv[None, :] * stride_dvd, b_dv.to(DV_OUT.dtype.element_ty), mask=m_store[:, None] & m_dv[None, :])


@triton.autotune(configs=configs("dq", ("BLOCK_M", "BLOCK_N")), prune_configs_by=pruner("dq", ("BLOCK_M", "BLOCK_N")),
                 key=_KEY)
@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DCQ, DSQ, DSLOPE, QPOS, KPOS, IDX1, IDX2, KLEN,
    TC, TS, SLOPES,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_qpos_b, stride_kpos_b, stride_slope_b, stride_tab_b, stride_tab_t,
    LQ, LK, H, KV_GROUP, K_GROUP, TAB_GROUP, P1, P2, DV, q_pos_offset,
    scale, phase, alpha, BOUNDS, stride_bounds_b, N_BOUNDS, win_l, win_r, softcap,
    ENC: tl.constexpr, CAUSAL: tl.constexpr, DEFAULT_POS: tl.constexpr, GATHER: tl.constexpr, HAS_KLEN: tl.constexpr,
    KLEN_LEFT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, FOPE_GRAD: tl.constexpr,
    PREC: tl.constexpr, DTYPE_KEY: tl.constexpr, FAST: tl.constexpr, ONE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
    BLOCK_DV: tl.constexpr, SLOPE_GRAD: tl.constexpr = False,
):
    """One block of queries of one head; K is raw, or pre-rotated for a rotation. ``SLOPE_GRAD`` (ALiBi): also
    each query row's share of ``dL/dslope = -sum_n dS[m, n] |m - n|`` into ``DSLOPE`` ``(B, H, LQ)`` float32."""
    pid_m, pid_bh = program_ids(LQ, BLOCK_M)
    i_b = pid_bh // H
    i_h = pid_bh % H
    i_b64 = i_b.to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < LQ
    o_p1, m_p1, o_p2, m_p2, o_d1, o_d2, o_dv, m_dv = head_layout(IDX1, IDX2, P1, P2, DV, GATHER, BLOCK_P1, BLOCK_P2,
                                                                 BLOCK_DV)
    ROTATION: tl.constexpr = (ENC == ENC_ROTARY) or (ENC == ENC_FOPE)
    ONE: tl.constexpr = ONE_DOT or ROTATION  # one product per tile, as in the dk/dv kernel
    BLOCK_W1: tl.constexpr = BLOCK_P1 + BLOCK_P2 * ROTATION
    o_s1, m_s1, o_s2, m_s2 = stream_layout(o_d1, m_p1, o_d2, m_p2, ROTATION, BLOCK_P1, BLOCK_P2)

    pos_m = positions(QPOS + i_b64 * stride_qpos_b, o_m, m_m, q_pos_offset, DEFAULT_POS)
    p_tc = TC + i_b64 * stride_tab_b
    p_ts = TS + i_b64 * stride_tab_b
    p_q = Q + i_b64 * stride_qb + i_h.to(tl.int64) * stride_qh
    b_q1, b_q2 = load_parts(p_q, o_m, m_m, o_d1, m_p1, o_d2, m_p2, stride_qt, stride_qd, ONE_DOT)  # raw
    b_qr1 = b_q1
    b_qr2 = b_q2
    if ROTATION:
        b_cos, b_sin = rotation_tables(o_m, m_m, i_h, p_tc, p_ts, stride_tab_t, TAB_GROUP, o_p1, m_p1, P1)
        b_r1, b_r2 = rotate(b_q1, b_q2, b_cos, b_sin)
        b_qr1 = join_parts(b_r1.to(b_q1.dtype), b_r2.to(b_q2.dtype))  # [BM, BP1 + BP2]
    slope = 0.0
    if ENC == ENC_ALIBI:
        slope = tl.load(SLOPES + i_b * stride_slope_b + i_h)
    b_do = tl.load(DO + i_b64 * stride_dob + i_h.to(tl.int64) * stride_doh + o_m[:, None].to(tl.int64) * stride_dot
                   + o_dv[None, :] * stride_dod, mask=m_m[:, None] & m_dv[None, :], other=0.0)
    b_lse = tl.load(LSE + pid_bh.to(tl.int64) * LQ + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(DELTA + pid_bh.to(tl.int64) * LQ + o_m, mask=m_m, other=0.0)
    p_k = K + i_b64 * stride_kb + (i_h // K_GROUP).to(tl.int64) * stride_kh
    p_v = V + i_b64 * stride_vb + (i_h // KV_GROUP).to(tl.int64) * stride_vh

    b_dq1 = tl.zeros([BLOCK_M, BLOCK_W1], dtype=tl.float32)
    b_dq2 = tl.zeros([BLOCK_M, BLOCK_P2], dtype=tl.float32)
    b_dslope = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, n_beg, n_end, n_tiles, t_a, t_b = key_stages(
        BOUNDS + i_b64 * stride_bounds_b, pid_m, N_BOUNDS, KLEN, i_b, LK, q_pos_offset, win_l, win_r, 0, LK, CAUSAL,
        WINDOW, DEFAULT_POS, HAS_KLEN, KLEN_LEFT, BLOCK_M, BLOCK_N)
    # stage 0: interior key tiles (no mask), stage 1: the boundary ones (masked), as in the forward
    for stage in tl.static_range(2):
        for i_t in range(0, stage_len(stage, n_tiles, t_a, t_b)):
            start_n = stage_start(stage, i_t, lo, t_a, t_b, BLOCK_N)
            o_n, m_n, pos_n = key_tile(start_n, n_beg, n_end, KPOS + i_b64 * stride_kpos_b, KLEN_LEFT, DEFAULT_POS,
                                       BLOCK_N)
            b_k1, b_k2 = load_parts(p_k, o_n, m_n, o_s1, m_s1, o_s2, m_s2, stride_kt, stride_kd, ONE)
            b_v = tl.load(p_v + o_n[:, None].to(tl.int64) * stride_vt + o_dv[None, :] * stride_vd,
                          mask=m_n[:, None] & m_dv[None, :], other=0.0)
            b_d1, b_d2 = part_dots(b_qr1, b_qr2, b_k1, b_k2, ENC, PREC, ONE)
            b_om = 0.0
            if ENC == ENC_TAPA:
                b_om = tapa_omega(pos_m, pos_n, phase, alpha, FAST)
            b_s, b_t = scores_log2(b_d1, b_d2, pos_m, pos_n, scale, slope, b_om, softcap, ENC, FAST, SOFTCAP)
            b_p = tl.exp2(b_s - b_lse[:, None])
            if stage == 1:
                b_p = tl.where(visible(pos_m, pos_n, m_m, m_n, CAUSAL, WINDOW, win_l, win_r), b_p, 0.0)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            if SLOPE_GRAD:
                b_dslope += tl.sum(b_ds * tl.abs(pos_m[:, None] - pos_n[None, :]).to(tl.float32), 1)
            b_g1, b_g2 = score_grads(b_ds, b_t, b_d1, b_d2, b_om, scale, ENC, FAST, SOFTCAP)
            b_dq1 = tl.dot(b_g1.to(b_k1.dtype), b_k1, b_dq1, input_precision=PREC)
            if not ONE:
                b_dq2 = tl.dot(b_g2.to(b_k2.dtype), b_k2, b_dq2, input_precision=PREC)

    if ROTATION:
        b_e1, b_e2 = split_parts(b_dq1)  # the rotated-frame gradient's parts
        if FOPE_GRAD:
            b_qf1 = b_q1.to(tl.float32)
            b_qf2 = b_q2.to(tl.float32)
            o_tab = ((i_b64 * LQ + o_m[:, None].to(tl.int64)) * H + i_h) * P1 + o_p1[None, :]
            m_tab = m_m[:, None] & m_p1[None, :]
            tl.store(DCQ + o_tab, b_e1 * b_qf1 + b_e2 * b_qf2, mask=m_tab)
            tl.store(DSQ + o_tab, b_e2 * b_qf1 - b_e1 * b_qf2, mask=m_tab)
        b_dq1, b_dq2 = rotate_back(b_e1, b_e2, b_cos, b_sin)
    p_dq = DQ + i_b64 * stride_dqb + i_h.to(tl.int64) * stride_dqh
    store_part(p_dq, b_dq1.to(DQ.dtype.element_ty), o_m, m_m, o_d1, m_p1, stride_dqt, stride_dqd)
    if not ONE_DOT:
        store_part(p_dq, b_dq2.to(DQ.dtype.element_ty), o_m, m_m, o_d2, m_p2, stride_dqt, stride_dqd)
    if SLOPE_GRAD:
        tl.store(DSLOPE + pid_bh.to(tl.int64) * LQ + o_m, -b_dslope, mask=m_m)


def attn_bwd(do, q, k, v, out, lse, q_pos, k_pos, plan: Plan, causal: bool, default_pos: bool,
             q_rot=None, k_rot=None, q_tables=None, k_tables=None, slope_grad: bool = False,
             bounds=None, k_lengths=None, k_left: bool = False, window=None, softcap=None):
    """Launch the backward kernels.

    ``q_rot`` (B, Lq, H, 2 BP) and ``k_rot`` (B, Lk, Hk', 2 BP) are the pre-rotated streaming operands (rotations
    only). Returns ``dq, dk, dv`` and, for learnable FoPE, the table gradients ``(dC, dS)`` of shape (B, rows, H, P)
    for the queries and the keys (else ``None``), and
    ALiBi's ``dL/dslopes`` ``(B, H)`` float32 when ``slope_grad`` (else ``None``).
    ``q_tables``/``k_tables``: the rotation's ``(cos, sin)`` tables of the query and key rows; ``bounds``,
    ``k_lengths``, ``k_left``, ``window``, ``softcap``: as for ``attn_fwd``.
    """
    b, lq, h, d = q.shape
    lk, hkv, dv = v.shape[1], v.shape[2], v.shape[3]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv_ = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    block_dv = triton.next_power_of_2(max(dv, 16))
    launcher(attn_bwd_preprocess_kernel)[(triton.cdiv(lq, 64) * b * h,)](
        out, do, delta, *out.stride(), *do.stride(), lq, h, dv, BLOCK_M=64, BLOCK_DV=block_dv)
    fope_grad = plan.enc == 2 and plan.fope_learnable
    if fope_grad:
        tabs = [torch.zeros(b, n, h, plan.p1, device=q.device, dtype=torch.float32) for n in (lq, lq, lk, lk)]
    else:
        tabs = [plan.fscale] * 4  # float32 placeholders
    q_stream = q_rot if plan.rotation else q
    k_stream = k_rot if plan.rotation else k
    pos_strides = (q_pos.stride(0) if q_pos.shape[0] > 1 else 0, k_pos.stride(0) if k_pos.shape[0] > 1 else 0,
                   plan.slope_stride_b)
    klen = plan.idx1 if k_lengths is None else k_lengths
    mask_scalars, mask_flags = mask_args(window, softcap)
    common = dict(ENC=plan.enc, CAUSAL=causal, DEFAULT_POS=default_pos, GATHER=plan.gather,
                  HAS_KLEN=k_lengths is not None, KLEN_LEFT=k_left, **mask_flags, FOPE_GRAD=fope_grad,
                  PREC=dot_precision(q.dtype), DTYPE_KEY=str(q.dtype), FAST=not interpreter(), BLOCK_P1=plan.block_p1,
                  BLOCK_P2=plan.block_p2, ONE_DOT=plan.one_dot, BLOCK_DV=block_dv)
    scalars = (plan.p1, plan.p2, dv, lk - lq, plan.scale, plan.phase, plan.alpha)
    kt_b, kt_t, kt_group = table_strides(plan, k_tables, h)
    qt_b, qt_t, qt_group = table_strides(plan, q_tables, h)

    launcher(attn_bwd_dkdv_kernel)[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]) * b * hkv,)](
        q_stream, k, v, do, lse, delta, dk, dv_, tabs[2], tabs[3], q_pos, k_pos, plan.idx1, plan.idx2, klen,
        *enc_args(plan, k_tables), *q_stream.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        *dv_.stride(), *pos_strides, kt_b, kt_t, lq, lk, h, hkv, h // hkv, kt_group, *scalars,
        *bounds_args(plan.idx1 if bounds is None else bounds[1], bounds is not None), *mask_scalars, **common)
    slope_grad = slope_grad and plan.enc == 3
    dslope = torch.empty(b, h, lq, device=q.device, dtype=torch.float32) if slope_grad else delta
    launcher(attn_bwd_dq_kernel)[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)](
        q, k_stream, v, do, lse, delta, dq, tabs[0], tabs[1], dslope, q_pos, k_pos, plan.idx1, plan.idx2, klen,
        *enc_args(plan, q_tables), *q.stride(), *k_stream.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *pos_strides, qt_b, qt_t, lq, lk, h, h // hkv, h // k_stream.shape[2], qt_group, *scalars,
        *bounds_args(plan.idx1 if bounds is None else bounds[0], bounds is not None), *mask_scalars, **common,
        SLOPE_GRAD=slope_grad)
    tables = (tabs[0], tabs[1], tabs[2], tabs[3]) if fope_grad else None
    return dq, dk, dv_, tables, (dslope.sum(-1) if slope_grad else None)
