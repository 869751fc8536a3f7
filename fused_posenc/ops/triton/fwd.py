"""Attention forward: one online-softmax core, the encoding selected by constexpr hooks."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .hooks import (ENC_ALIBI, ENC_FOPE, ENC_ROTARY, ENC_TAPA, head_layout, join_parts, key_stages, key_tile,
                    load_encoded, load_parts, part_dots, positions, program_ids, scores_log2, stage_len, stage_start,
                    stream_layout, tapa_omega, visible)
from .plan import Plan, interpreter, launcher
from .tuning import configs, pruner


@triton.autotune(configs=configs("fwd", ("BLOCK_M", "BLOCK_N")), prune_configs_by=pruner("fwd", ("BLOCK_M", "BLOCK_N")),
                 key=["BLOCK_P1", "BLOCK_P2", "ONE_DOT", "BLOCK_DV", "ENC", "CAUSAL", "DEFAULT_POS", "GATHER",
                      "HAS_KLEN", "KLEN_LEFT", "WINDOW", "SOFTCAP", "DTYPE_KEY"])
@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, IDX1, IDX2, KLEN,
    TC, TS, SLOPES,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od, stride_os, stride_lse_s,
    stride_qpos_b, stride_kpos_b, stride_slope_b, stride_tab_b, stride_tab_t,
    LQ, LK, H, KV_GROUP, K_GROUP, TAB_GROUP, P1, P2, DV, q_pos_offset,
    scale, phase, alpha, BOUNDS, stride_bounds_b, N_BOUNDS, N_SPLITS, SPLIT_LEN, win_l, win_r, softcap,
    ENC: tl.constexpr, CAUSAL: tl.constexpr, DEFAULT_POS: tl.constexpr, GATHER: tl.constexpr,
    HAS_KLEN: tl.constexpr, KLEN_LEFT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    PREC: tl.constexpr, DTYPE_KEY: tl.constexpr, FAST: tl.constexpr, ONE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bhs = program_ids(LQ, BLOCK_M)
    # flash-decoding: split i_s of N_SPLITS takes the keys [i_s * SPLIT_LEN, (i_s + 1) * SPLIT_LEN) (one split:
    # all keys), writing its own normalised partial output and log-sum-exp for attn_fwd to merge
    i_s = pid_bhs % N_SPLITS
    pid_bh = pid_bhs // N_SPLITS
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
    b_q1, b_q2 = load_encoded(p_q, o_m, m_m, o_d1, m_p1, o_d2, m_p2, stride_qt, stride_qd, i_h, p_tc, p_ts,
                              stride_tab_t, TAB_GROUP, o_p1, m_p1, P1, ENC, ONE_DOT)
    # a rotation's parts as one [BM, BP1 + BP2] tile, against the keys' pre-rotated rows: one product per tile
    ROTATION: tl.constexpr = (ENC == ENC_ROTARY) or (ENC == ENC_FOPE)
    ONE: tl.constexpr = ONE_DOT or ROTATION
    if ROTATION:
        b_q1 = join_parts(b_q1, b_q2)
    o_s1, m_s1, o_s2, m_s2 = stream_layout(o_d1, m_p1, o_d2, m_p2, ROTATION, BLOCK_P1, BLOCK_P2)
    slope = 0.0
    if ENC == ENC_ALIBI:
        slope = tl.load(SLOPES + i_b * stride_slope_b + i_h)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # the keys [lo, hi) this program visits: its split's, the row's (key padding), and those the causal rule and the
    # window leave to the block (from the block index with default positions, else from bounds.py's ranges); the
    # keys [f_lo, f_hi) every query of the block sees
    lo, n_beg, n_end, n_tiles, t_a, t_b = key_stages(
        BOUNDS + i_b64 * stride_bounds_b, pid_m, N_BOUNDS, KLEN, i_b, LK, q_pos_offset, win_l, win_r,
        i_s * SPLIT_LEN, i_s * SPLIT_LEN + SPLIT_LEN, CAUSAL, WINDOW, DEFAULT_POS, HAS_KLEN, KLEN_LEFT, BLOCK_M, BLOCK_N)
    # stage 0: the interior tiles, every (query, key) pair visible, no mask; stage 1: the boundary tiles (the
    # diagonal, the window's edges, ragged and padded key ranges), masked
    for stage in tl.static_range(2):
        for i_t in range(0, stage_len(stage, n_tiles, t_a, t_b)):
            start_n = stage_start(stage, i_t, lo, t_a, t_b, BLOCK_N)
            o_n, m_n, pos_n = key_tile(start_n, n_beg, n_end, KPOS + i_b64 * stride_kpos_b, KLEN_LEFT, DEFAULT_POS,
                                       BLOCK_N)
            # keys as stored: raw, or rotated once per call (rotate.py)
            b_k1, b_k2 = load_parts(p_k, o_n, m_n, o_s1, m_s1, o_s2, m_s2, stride_kt, stride_kd, ONE)
            b_d1, b_d2 = part_dots(b_q1, b_q2, b_k1, b_k2, ENC, PREC, ONE)
            b_om = 0.0
            if ENC == ENC_TAPA:
                b_om = tapa_omega(pos_m, pos_n, phase, alpha, FAST)
            b_s, _ = scores_log2(b_d1, b_d2, pos_m, pos_n, scale, slope, b_om, softcap, ENC, FAST, SOFTCAP)  # [BM, BN]
            if stage == 1:
                b_s = tl.where(visible(pos_m, pos_n, m_m, m_n, CAUSAL, WINDOW, win_l, win_r), b_s, float("-inf"))
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
    p_o = O + i_s.to(tl.int64) * stride_os + i_b64 * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(p_o + o_m[:, None].to(tl.int64) * stride_ot + o_dv[None, :] * stride_od, b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & m_dv[None, :])
    tl.store(LSE + i_s.to(tl.int64) * stride_lse_s + pid_bh.to(tl.int64) * LQ + o_m, b_lse, mask=m_m)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full fp32 products (as PyTorch's fp32 matmul does); halves use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def enc_args(plan: Plan, tables):
    """Encoding pointers of a kernel call; ``tables``: the rotation's ``(cos, sin)`` tables of the rows the
    kernel rotates, each ``(Bt, rows, Ht, P)`` float32 (``None`` otherwise)."""
    tc, ts = tables if tables is not None else (plan.fscale, plan.fscale)  # float32 placeholders
    return (tc, ts, plan.slopes)


def table_strides(plan: Plan, tables, nheads: int):
    """``(stride_b, stride_t, group)`` of rotation tables: query head ``h`` reads table head ``h // group``."""
    if tables is None:
        return 0, 0, 1
    tc = tables[0]
    return (tc.stride(0) if tc.shape[0] > 1 else 0), tc.stride(1), nheads // tc.shape[2]


def bounds_args(t: torch.Tensor, used: bool):
    """``(pointer, batch stride, chunks)`` of a ``(Bb, 2, chunks)`` range tensor (``bounds.py``), or of a
    placeholder."""
    if not used:
        return t, 0, 0
    return t, (t.stride(0) if t.shape[0] > 1 else 0), t.shape[2]


def mask_args(window, softcap):
    """``(win_l, win_r, softcap)`` kernel scalars and ``(WINDOW, SOFTCAP)`` flags. A window side of 2^31 or more
    is unbounded (-1): every position difference is below 2^31."""
    wl, wr = window if window is not None else (-1, -1)
    wl, wr = (-1 if w >= 2**31 - 1 else int(w) for w in (wl, wr))
    return (wl, wr, float(softcap or 0.0)), dict(WINDOW=window is not None, SOFTCAP=softcap is not None)


def attn_fwd(q, k, v, q_pos, k_pos, plan: Plan, causal: bool, default_pos: bool, q_tables=None,
             bounds=None, k_lengths=None, num_splits: int = 1, k_left: bool = False, window=None, softcap=None):
    """Launch the forward kernel.

    q: (B, Lq, H, D) raw; k: (B, Lk, Hk, D) raw, or for a rotation pre-rotated (``rotate.rotate_tensor``: (B, Lk, Hk,
    2 BP), the kernels' order);
    v: (B, Lk, Hkv, Dv); q_pos/k_pos: (Bp, L) int64; ``bounds``: ``bounds.tile_bounds`` of the positions
    (causal or windowed with caller-given positions; else ``None``); ``k_lengths`` (B,) int32: only keys
    ``n < k_lengths[b]`` take part (``k_left``: ``n >= Lk - k_lengths[b]``), or ``None``; ``window`` ``(left,
    right)`` or ``None``, ``softcap`` ``float`` or ``None``: as ``Problem``'s. ``num_splits > 1`` (flash-decoding): the keys are cut into that many ranges, one
    program per (query block, head, range), and the partial results are merged here through their log-sum-exps.
    Returns ``out (B, Lq, H, Dv)``, ``lse (B, H, Lq)`` (float32, log2 domain, +inf for rows that see no key).
    """
    b, lq, h, _ = q.shape
    lk, hkv, dv = v.shape[1], v.shape[2], v.shape[3]
    num_splits = max(1, min(int(num_splits), lk))
    split_len = triton.cdiv(lk, num_splits)
    num_splits = triton.cdiv(lk, split_len)  # no empty trailing range
    if num_splits == 1:
        out = torch.empty(b, lq, h, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    else:  # float32 partials, merged below
        out = torch.empty(num_splits, b, lq, h, dv, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, b, h, lq, device=q.device, dtype=torch.float32)
    o_strides = out.stride()[-4:]
    split_strides = (out.stride(0), lse.stride(0)) if num_splits > 1 else (0, 0)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]) * b * h * num_splits,)

    tab_b, tab_t, tab_group = table_strides(plan, q_tables, h)
    kend = plan.idx1 if bounds is None else bounds[0]
    mask_scalars, mask_flags = mask_args(window, softcap)
    launcher(attn_fwd_kernel)[grid](
        q, k, v, out, lse, q_pos, k_pos, plan.idx1, plan.idx2, plan.idx1 if k_lengths is None else k_lengths,
        *enc_args(plan, q_tables), *q.stride(), *k.stride(), *v.stride(), *o_strides, *split_strides,
        q_pos.stride(0) if q_pos.shape[0] > 1 else 0, k_pos.stride(0) if k_pos.shape[0] > 1 else 0,
        plan.slope_stride_b, tab_b, tab_t,
        lq, lk, h, h // hkv, h // k.shape[2], tab_group, plan.p1, plan.p2, dv, lk - lq,
        plan.scale, plan.phase, plan.alpha, *bounds_args(kend, bounds is not None), num_splits, split_len,
        *mask_scalars, ENC=plan.enc, CAUSAL=causal, DEFAULT_POS=default_pos, GATHER=plan.gather,
        HAS_KLEN=k_lengths is not None, KLEN_LEFT=k_left, **mask_flags,
        PREC=dot_precision(q.dtype), DTYPE_KEY=str(q.dtype), FAST=not interpreter(),
        BLOCK_P1=plan.block_p1, BLOCK_P2=plan.block_p2, ONE_DOT=plan.one_dot,
        BLOCK_DV=triton.next_power_of_2(max(dv, 16)),
    )
    if num_splits == 1:
        return out, lse
    return merge_splits(out, lse, q.dtype)


def merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """``(S, B, Lq, H, Dv)`` float32 partials and their ``(S, B, H, Lq)`` log2 lses (+inf: the range had no
    visible key) to ``out (B, Lq, H, Dv)`` in ``dtype`` and ``lse (B, H, Lq)`` (log2, +inf for empty rows)."""
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    top = lse.amax(0)  # (B, H, Lq)
    top_use = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w = torch.exp2(lse - top_use)  # (S, B, H, Lq); 0 for empty ranges
    total = w.sum(0)
    merged = (w.transpose(2, 3)[..., None] * out).sum(0) / torch.where(total > 0, total, 1.0).transpose(1, 2)[..., None]
    lse_m = torch.where(total > 0, top_use + torch.log2(torch.where(total > 0, total, 1.0)),
                        torch.full_like(total, float("inf")))
    return merged.to(dtype), lse_m.contiguous()


LN2 = math.log(2.0)
