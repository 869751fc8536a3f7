"""The C++/CUDA extension backend (``backend="cpu"`` / ``"cuda"``): launcher, autograd, entry point.

Layout: the kernels live in ``csrc/`` (``fused_posenc._C``); :func:`_launch_fwd`/:func:`_launch_bwd`
pack an encoding's :class:`~fused_posenc.encodings.base.KernelParams` into the extension's flat
argument list; :class:`NativeAttention` is the autograd layer; :func:`native_attention` is what the
backend registry calls with a validated :class:`~fused_posenc.attention.Problem`.

Learnable FoPE: the coefficients are passed expanded to one slice per query head and zero-padded to
``(H, Dk, P)``; the kernels return gradients w.r.t. that expanded tensor and autograd through the
expansion (``repeat_interleave``/``expand``/``cat``) sums them back to the module's ``(Hc, Dk, Dout)``.
"""
from __future__ import annotations

import torch

from ..backends.common import learnable_slopes
from .autograd_util import PerEncodingCache, single_backward

_KIND = {"none": 0, "rotary": 1, "fope": 2, "alibi": 3, "tapa": 4}


def _ext():
    from .. import _C

    return _C


# --- launcher ------------------------------------------------------------------------------------------
def _empty(device):
    return torch.empty(0, device=device)


def _param_args(kp, cos_coef, sin_coef, device):
    """KernelParams -> the extension's flat encoding arguments (``cos_coef``/``sin_coef`` replace the
    detached copies in ``kp`` so that their gradients can flow)."""
    e = _empty(device)

    def t(x):
        return e if x is None else x

    return [_KIND[kp.kind], t(kp.idx1), t(kp.idx2), t(kp.pair_turns), t(kp.pair_scale), t(kp.fope_turns),
            t(cos_coef), t(sin_coef), t(kp.fope_pad), t(kp.slopes), int(kp.tapa_split), float(kp.tapa_phase_scale),
            float(kp.tapa_alpha)]


def _launch_fwd(q, k, v, q_pos, k_pos, causal, scale, enc_args):
    out, lse = _ext().forward(q, k, v, q_pos, k_pos, causal, scale, *enc_args)
    return out, lse


def _launch_bwd(do, q, k, v, out, lse, q_pos, k_pos, causal, scale, enc_args, want_coef, want_slopes):
    return _ext().backward(do, q, k, v, out, lse, q_pos, k_pos, causal, scale, *enc_args, want_coef, want_slopes)


# --- autograd ------------------------------------------------------------------------------------------
class NativeAttention(torch.autograd.Function):
    """Inputs: q, k, v; FoPE's expanded coefficients ``(H, Dk, P)`` float32 (or empty tensors); ALiBi's
    slopes ``(Bs, H)`` float32 (or an empty tensor); positions ``(Bp, L)`` int64; the remaining encoding
    arguments as plain values."""

    @staticmethod
    def forward(ctx, q, k, v, cos_coef, sin_coef, slopes, q_pos, k_pos, causal, scale, enc_args):
        args = list(enc_args)
        args[6], args[7], args[9] = cos_coef.detach(), sin_coef.detach(), slopes.detach()
        out, lse = _launch_fwd(q.detach(), k.detach(), v.detach(), q_pos, k_pos, causal, scale, args)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, cos_coef, sin_coef, slopes)
        ctx.causal, ctx.scale, ctx.enc_args = causal, scale, enc_args
        return out

    @staticmethod
    @single_backward
    def backward(ctx, do):
        q, k, v, out, lse, q_pos, k_pos, cos_coef, sin_coef, slopes = ctx.saved_tensors
        args = list(ctx.enc_args)
        args[6], args[7], args[9] = cos_coef, sin_coef, slopes
        want_coef = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        want_slopes = ctx.needs_input_grad[5]
        dq, dk, dv, dA, dB, dslopes = _launch_bwd(do.contiguous(), q, k, v, out, lse, q_pos, k_pos, ctx.causal,
                                                  ctx.scale, args, want_coef, want_slopes)
        if not want_coef:
            dA = dB = None
        if want_slopes:  # (B, H) -> the slopes' (Bs, H)
            dslopes = dslopes.sum(0, keepdim=True) if slopes.shape[0] == 1 else dslopes
        else:
            dslopes = None
        return dq, dk, dv, dA, dB, dslopes, None, None, None, None, None


_PARAMS = PerEncodingCache()  # kernel parameters on the device: a call copies nothing


# --- public ----------------------------------------------------------------------------------------------
def native_attention(problem, name: str = "cpu") -> torch.Tensor:
    """Run a validated :class:`~fused_posenc.attention.Problem` through ``fused_posenc._C``.

    ``name`` is the backend (``"cpu"`` or ``"cuda"``); the tensors' device decides the kernels.
    """
    p = problem
    enc = p.encoding
    b, lq, lk, h, hkv, d, dv = p.shape
    dev = p.q.device
    kp = _PARAMS.get(enc, (d, h, hkv, b, str(dev)), lambda: enc.kernel_params(d, h, hkv, b, dev))
    scale = float(enc.score_scale(d, p.softmax_scale))
    cos_coef = sin_coef = slopes = _empty(dev)
    if kp.kind == "fope":
        cos_coef, sin_coef = kp.fope_cos_coef, kp.fope_sin_coef
        if getattr(enc, "learnable", False) and torch.is_grad_enabled():
            a, bb = enc.coef_per_query_head(h, hkv)  # differentiable (H, Dk, Dout)
            pad = torch.zeros(h, a.shape[1], d // 2 - a.shape[2], device=dev, dtype=torch.float32)
            cos_coef = torch.cat([a.to(device=dev, dtype=torch.float32), pad], -1)
            sin_coef = torch.cat([bb.to(device=dev, dtype=torch.float32), pad], -1)
    if kp.kind == "alibi":  # (Bs, H); the live, differentiable slopes when their gradient is wanted
        slopes = enc.slopes(h, b, dev) if learnable_slopes(p) else kp.slopes
    enc_args = _param_args(kp, None, None, dev)
    return NativeAttention.apply(p.q, p.k, p.v, cos_coef, sin_coef, slopes, p.q_pos.contiguous(),
                                 p.k_pos.contiguous(), p.causal, scale, enc_args)
