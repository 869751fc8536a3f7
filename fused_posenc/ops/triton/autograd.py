"""Autograd layer of the Triton backend and its public entry point ``triton_attention``."""
from __future__ import annotations

import os

import torch

from .bwd import attn_bwd
from .fwd import attn_fwd
from .plan import Plan, make_plan
from .rotate import rotate_tensor

STREAM_MODES = ("pre", "inline")


def stream_mode(plan: Plan) -> str:
    """How the streaming operand is rotated: ``"pre"`` (once per call into an O(seqlen) buffer) or
    ``"inline"`` (per tile inside the loop). FoPE always pre-rotates (its tables are matmuls).
    Override with ``FUSED_POSENC_ROTATE_STREAM``."""
    if plan.enc == 2:
        return "pre"
    mode = os.environ.get("FUSED_POSENC_ROTATE_STREAM", "pre")
    if mode not in STREAM_MODES:
        raise ValueError(f"FUSED_POSENC_ROTATE_STREAM must be one of {STREAM_MODES}, got {mode!r}")
    return mode


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fope_a, fope_b, q_pos, k_pos, plan: Plan, causal: bool, default_pos: bool):
        inline = stream_mode(plan) == "inline" or not plan.rotation
        k_arg = k if inline else rotate_tensor(k, k_pos, plan, plan.k_heads_rot, default_pos, nheads=q.shape[2])
        out, lse = attn_fwd(q, k_arg, v, q_pos, k_pos, plan, causal, default_pos, rotate_k=inline)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.plan, ctx.causal, ctx.default_pos, ctx.inline = plan, causal, default_pos, inline
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        plan, inline = ctx.plan, ctx.inline
        q_rot = k_rot = None
        if not inline:
            lq, lk = q.shape[1], k.shape[1]
            q_rot = rotate_tensor(q, q_pos, plan, q.shape[2], ctx.default_pos, pos_offset=lk - lq)
            k_rot = rotate_tensor(k, k_pos, plan, plan.k_heads_rot, ctx.default_pos, nheads=q.shape[2])
        dq, dk, dv, tables = attn_bwd(do, q, k, v, out, lse, q_pos, k_pos, plan, ctx.causal, ctx.default_pos,
                                      rotate_stream=inline, q_rot=q_rot, k_rot=k_rot)
        da = db = None
        if tables is not None:
            da, db = fope_coef_grads(tables, q_pos, k_pos, plan, q.shape[0], ctx.default_pos, k.shape[1] - q.shape[1])
        return dq, dk, dv, da, db, None, None, None, None, None


def fope_coef_grads(tables, q_pos, k_pos, plan: Plan, batch: int, default_pos: bool, q_offset: int):
    """``dA[h,k,i] = sum_rows cos(w_k t) dC[row,h,i]``, ``dB`` with sin and dS, over queries and keys."""
    dcq, dsq, dck, dsk = tables
    if default_pos:  # the kernels computed positions from indices; rebuild them here
        q_pos = torch.arange(q_offset, q_offset + dcq.shape[1], device=dcq.device)[None]
        k_pos = torch.arange(dck.shape[1], device=dck.device)[None]
    da = db = 0
    for pos, dc, ds in ((q_pos, dcq, dsq), (k_pos, dck, dsk)):
        ang = pos.to(torch.float32)[..., None] * plan.fw  # (Bp, T, NF), float32 like the kernels
        ang = ang.expand(batch, -1, -1)
        da = da + torch.einsum("btk,bthi->hki", torch.cos(ang), dc)
        db = db + torch.einsum("btk,bthi->hki", torch.sin(ang), ds)
    return da, db


def triton_attention(p) -> torch.Tensor:
    """Run a validated :class:`~fused_posenc.attention.Problem` through the Triton kernels."""
    enc = p.encoding
    b, lq, lk, h, hkv, d, dv = p.shape
    kp = enc.kernel_params(d, h, hkv, b, p.q.device)
    fope_a = fope_b = None
    if kp.kind == "fope" and kp.fope_learnable:
        a, bb = enc.coef_per_query_head(h, hkv)  # differentiable expansion to (H, Dk, Dout)
        pad = torch.zeros(h, a.shape[1], d // 2 - a.shape[2], device=p.q.device, dtype=torch.float32)
        fope_a = torch.cat([a.to(p.q.device, torch.float32), pad], -1)
        fope_b = torch.cat([bb.to(p.q.device, torch.float32), pad], -1)
    plan = make_plan(kp, d, h, hkv, enc.score_scale(d, p.softmax_scale), p.q.device,
                     fope_coefs=None if fope_a is None else (fope_a.detach(), fope_b.detach()),
                     fope_heads=getattr(enc, "num_heads", 1))
    q_pos = p.q_pos.contiguous()
    k_pos = p.k_pos.contiguous()
    return TritonAttention.apply(p.q, p.k, p.v, fope_a, fope_b, q_pos, k_pos, plan, p.causal, p.default_positions)
