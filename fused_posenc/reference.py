"""The materialised PyTorch oracle: every backend is tested against this.

It builds the full ``(B, H, Lq, Lk)`` score matrix from each encoding's naive math
(``encodings/*``), so it is O(seqlen^2) in memory and meant for tests and small problems. It runs
in the inputs' dtype (float64 inputs give a float64 oracle); angles and tables are float32 or
float64, never the input dtype; the softmax runs in float32 or better.
"""
from __future__ import annotations

import torch

from .encodings.base import Encoding


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enc: Encoding, causal: bool,
                   softmax_scale, q_pos: torch.Tensor, k_pos: torch.Tensor, return_lse: bool = False,
                   k_lengths=None, k_padding_left: bool = False, window=None, softcap=None):
    """Reference attention on validated inputs.

    q: (B, Lq, H, D); k: (B, Lk, Hkv, D); v: (B, Lk, Hkv, Dv); q_pos: (Bp, Lq), k_pos: (Bp, Lk) int64;
    ``k_lengths`` (B,) or None: only keys ``n < k_lengths[b]`` take part (key padding; ``k_padding_left``: only keys
    ``n >= Lk - k_lengths[b]``); ``window`` ``(left, right)`` or None: only keys with ``q_pos - left <= k_pos <= q_pos +
    right`` (-1: unbounded); ``softcap``: scores capped to ``softcap * tanh(s / softcap)`` before ALiBi's bias.
    Returns (B, Lq, H, Dv) in q's dtype; with ``return_lse`` also the rows' log-sum-exp (B, H, Lq), float32
    (float64 for float64 inputs), -inf for rows that see no key. Differentiable w.r.t. q, k, v and encoding
    parameters.
    """
    batch, nheads_q = q.shape[0], q.shape[2]
    nheads, nheads_kv = q.shape[2], k.shape[2]
    group = nheads // nheads_kv
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    if enc.is_rotation:
        q = enc.rotate(q, q_pos, nheads, nheads_kv)
        k = enc.rotate(k, k_pos, nheads, nheads_kv)
    scores = enc.scores(q, k, q_pos, k_pos, softmax_scale, causal=causal, softcap=softcap)  # (B, H, Lq, Lk)
    sm_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(sm_dtype)
    masked = causal or k_lengths is not None or window is not None
    if masked:
        lq, lk = q.shape[1], k.shape[1]
        visible = torch.ones(1, lq, lk, dtype=torch.bool, device=q.device)
        diff = q_pos[:, :, None] - k_pos[:, None, :]  # (Bp, Lq, Lk) int64, exact for positions in [-2^62, 2^62)
        if causal:
            visible = visible & (diff >= 0)
        if window is not None:
            left, right = window
            if left >= 0:
                visible = visible & (diff <= left)
            if right >= 0:
                visible = visible & (-diff <= right)
        if k_lengths is not None:
            n = torch.arange(lk, device=q.device)[None, :]
            lens = k_lengths.to(q.device)[:, None]
            keep = n >= lk - lens if k_padding_left else n < lens  # (B, Lk)
            visible = visible & keep[:, None, :]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        empty = ~visible.any(-1)  # (Bp, Lq): rows that see no key output zeros
        scores = scores.masked_fill(empty[:, None, :, None], 0.0)
    p = torch.softmax(scores, dim=-1)
    if masked:
        p = p.masked_fill(empty[:, None, :, None], 0.0)
    out = torch.einsum("bhmn,bnhd->bmhd", p.to(v.dtype), v)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq)
    shift = enc.lse_shift(q_pos, k_pos, causal, nheads_q, batch)  # what scores() added to each row
    if shift is not None:
        lse = lse - shift.to(lse.dtype)
    if masked:
        lse = lse.masked_fill(empty[:, None, :], float("-inf"))
    return out, lse
