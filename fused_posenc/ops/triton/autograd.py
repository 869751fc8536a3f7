"""Autograd layer of the Triton backend and its public entry point ``triton_attention``."""
from __future__ import annotations

import os

import torch

from ..autograd_util import PerEncodingCache, single_backward
from ...backends.common import learnable_slopes
from .bounds import causal_bounds
from .bwd import attn_bwd
from .fwd import attn_fwd
from .plan import Plan, make_plan
from .rotate import rotate_tensor

STREAM_MODES = ("pre", "inline")
_PLANS = PerEncodingCache()


def stream_mode(plan: Plan) -> str:
    """How the streaming operand is rotated: ``"pre"`` (once per call into an O(seqlen) buffer) or
    ``"inline"`` (per tile inside the loop; RoPE/HoPE only). Override with ``FUSED_POSENC_ROTATE_STREAM``."""
    mode = os.environ.get("FUSED_POSENC_ROTATE_STREAM", "pre")
    if mode not in STREAM_MODES:
        raise ValueError(f"FUSED_POSENC_ROTATE_STREAM must be one of {STREAM_MODES}, got {mode!r}")
    return "pre" if plan.enc == 2 else mode


class TritonAttention(torch.autograd.Function):
    """Inputs: q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv); FoPE tables ``(Bt, rows, Ht, P)``
    float32 for the query and key rows (``None`` for other encodings); ALiBi slopes ``(Bs, H)`` when their
    gradient is wanted (the kernels read the plan's detached copy of the same values; else ``None``);
    positions (Bp, L) int64."""

    @staticmethod
    def forward(ctx, q, k, v, tcq, tsq, tck, tsk, slopes, q_pos, k_pos, plan: Plan, causal: bool, default_pos: bool):
        inline = stream_mode(plan) == "inline" or not plan.rotation
        q_tab = None if tcq is None else (tcq, tsq)
        k_tab = None if tck is None else (tck, tsk)
        k_arg = k if inline else rotate_tensor(k, k_pos, plan, plan.k_heads_rot, default_pos, nheads=q.shape[2],
                                               tables=k_tab)
        bounds = causal_bounds(q_pos, k_pos) if causal and not default_pos else None  # tile skipping
        out, lse = attn_fwd(q, k_arg, v, q_pos, k_pos, plan, causal, default_pos, rotate_k=inline, q_tables=q_tab,
                            bounds=bounds)
        ctx.bounds = bounds
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, tcq, tsq, tck, tsk)
        ctx.slopes_batch = None if slopes is None else slopes.shape[0]
        ctx.plan, ctx.causal, ctx.default_pos, ctx.inline = plan, causal, default_pos, inline
        return out

    @staticmethod
    @single_backward
    def backward(ctx, do):
        q, k, v, out, lse, q_pos, k_pos, tcq, tsq, tck, tsk = ctx.saved_tensors
        plan, inline = ctx.plan, ctx.inline
        q_tab = None if tcq is None else (tcq, tsq)
        k_tab = None if tck is None else (tck, tsk)
        q_rot = k_rot = None
        if not inline:
            lq, lk = q.shape[1], k.shape[1]
            q_rot = rotate_tensor(q, q_pos, plan, q.shape[2], ctx.default_pos, pos_offset=lk - lq, tables=q_tab)
            k_rot = rotate_tensor(k, k_pos, plan, plan.k_heads_rot, ctx.default_pos, nheads=q.shape[2], tables=k_tab)
        slope_grad = ctx.slopes_batch is not None and ctx.needs_input_grad[7]
        dq, dk, dv, tabs, dslopes = attn_bwd(do, q, k, v, out, lse, q_pos, k_pos, plan, ctx.causal, ctx.default_pos,
                                             rotate_stream=inline, q_rot=q_rot, k_rot=k_rot, q_tables=q_tab,
                                             k_tables=k_tab, slope_grad=slope_grad, bounds=ctx.bounds)
        if dslopes is not None and ctx.slopes_batch == 1:  # (B, H) -> the slopes' (1, H)
            dslopes = dslopes.sum(0, keepdim=True)
        grads = [None] * 4
        if tabs is not None:  # per-row, per-query-head table gradients -> the tables' own shapes
            grads = [_reduce_table_grad(g, t) for g, t in zip(tabs, (tcq, tsq, tck, tsk))]
        return (dq, dk, dv, *grads, dslopes, None, None, None, None, None)


def _reduce_table_grad(g, table):
    """(B, rows, H, P) -> table's (Bt, rows, Ht, P): sum over the query heads sharing a table head, and
    over the batch when the table is shared."""
    b, rows, h, p = g.shape
    ht = table.shape[2]
    g = g.view(b, rows, ht, h // ht, p).sum(3)
    return g.sum(0, keepdim=True) if table.shape[0] == 1 and b > 1 else g


def fope_tables(enc, pos: torch.Tensor):
    """FoPE ``(C, S)`` for rows at ``pos (Bp, L)``: ``(Bp, L, Hc, P)`` float32, contiguous, differentiable
    w.r.t. the coefficients. Exact angles (``encodings/angles.py``); the Fourier sums in float64 (a TF32
    matmul would cost ~1e-3 of relative accuracy), then rounded to float32. The kernels map query head
    ``h`` to table head ``h // (nheads // Hc)``."""
    c, s = enc.fourier_tables(pos, enc.cos_coef, enc.sin_coef, torch.float32, sum_dtype=torch.float64)
    return c.contiguous(), s.contiguous()


def _cached_plan(enc, d, h, hkv, b, device, scale) -> Plan:
    """The plan of (encoding, shape, device), cached per encoding object (``PerEncodingCache``)."""
    return _PLANS.get(enc, (d, h, hkv, b, str(device), scale), lambda: make_plan(
        enc.kernel_params(d, h, hkv, b, device), d, h, hkv, scale, device, fope_heads=getattr(enc, "num_heads", 1)))


def triton_attention(p) -> torch.Tensor:
    """Run a validated :class:`~fused_posenc.attention.Problem` through the Triton kernels."""
    enc = p.encoding
    b, lq, lk, h, hkv, d, dv = p.shape
    plan = _cached_plan(enc, d, h, hkv, b, p.q.device, enc.score_scale(d, p.softmax_scale))
    tables = [None] * 4
    slopes = enc.slopes(h, b, p.q.device) if learnable_slopes(p) else None  # differentiable (Bs, H)
    if plan.enc == 2:
        learnable = enc.learnable and torch.is_grad_enabled()
        plan = Plan(**{**plan.__dict__, "fope_learnable": learnable})
        tables = [*fope_tables(enc, p.q_pos), *fope_tables(enc, p.k_pos)]
    return TritonAttention.apply(p.q, p.k, p.v, *tables, slopes, p.q_pos.contiguous(), p.k_pos.contiguous(), plan,
                                 p.causal, p.default_positions)
