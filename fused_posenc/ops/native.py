"""The C++/CUDA extension backend (``backend="cpu"`` / ``"cuda"``): launcher, autograd, entry point.

Layout: the kernels live in ``csrc/`` (``fused_posenc._C``); :func:`_param_args` packs an encoding's
:class:`~fused_posenc.encodings.base.KernelParams` into the extension's flat argument list; the custom ops
``fused_posenc::native_forward`` / ``native_backward`` (:func:`native_forward`, :func:`native_backward`) are
the calls torch.compile sees; :class:`NativeAttention` is the autograd layer; :func:`native_attention` is what
the backend registry calls with a validated :class:`~fused_posenc.attention.Problem`.

Learnable FoPE: the coefficients are passed expanded to one slice per query head and zero-padded to
``(H, Dk, P)``; the kernels return gradients w.r.t. that expanded tensor and autograd through the
expansion (``repeat_interleave``/``expand``/``cat``) sums them back to the module's ``(Hc, Dk, Dout)``.
"""
from __future__ import annotations

import functools

import torch

from ..backends.common import learnable_slopes
from ..encodings.alibi import nearest_key_distance
from ..encodings.base import encoding_by_id
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


# The extension's calls as torch.library custom ops, so that torch.compile traces a call as one node (fullgraph, no
# graph break) with shapes from the fake implementations. What is Python-heavy (an encoding's kernel parameters:
# exact turn fractions, pair tables, the per-encoding cache) happens inside the ops, which run eagerly, so a cold
# cache never meets the tracer; the ops find the encoding by its ``id`` (encodings/base.py encoding_by_id).
# Learnable tensors (FoPE's coefficients, ALiBi's slopes) are op inputs; empty tensors stand for "the encoding's own
# (frozen) values". The ops have no derivative of their own: NativeAttention is the autograd layer.
def _launch_fwd(q, k, v, q_pos, k_pos, causal, window_left, window_right, softcap, scale, enc_args):
    """The binding itself, with a flat encoding argument list (scripts/fuzz_native.py feeds it bad inputs).
    ``window_left``/``window_right``: the window's bounds, -1 for unbounded; ``softcap``: 0.0 for none."""
    return _ext().forward(q, k, v, q_pos, k_pos, causal, window_left, window_right, softcap, scale, *enc_args)


def _launch_bwd(do, q, k, v, out, lse, q_pos, k_pos, causal, window_left, window_right, softcap, scale, enc_args,
                want_coef, want_slopes):
    return _ext().backward(do, q, k, v, out, lse, q_pos, k_pos, causal, window_left, window_right, softcap, scale,
                           *enc_args, want_coef, want_slopes)


def _kernel_args(enc_id: int, q, k, cos_coef, sin_coef, slopes) -> list:
    """The extension's flat encoding arguments for a call (see _param_args)."""
    enc = encoding_by_id(enc_id)
    b, _, h, d = q.shape
    hkv, dev = k.shape[2], q.device
    kp = _PARAMS.get(enc, (d, h, hkv, b, str(dev)), lambda: enc.kernel_params(d, h, hkv, b, dev))
    args = _param_args(kp, cos_coef if cos_coef.numel() else kp.fope_cos_coef,
                       sin_coef if sin_coef.numel() else kp.fope_sin_coef, dev)
    if slopes.numel():
        args[9] = slopes
    return args


@torch.library.custom_op("fused_posenc::native_forward", mutates_args=())
def native_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   cos_coef: torch.Tensor, sin_coef: torch.Tensor, slopes: torch.Tensor, enc_id: int, causal: bool,
                   window_left: int, window_right: int, softcap: float,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_posenc._C.forward``: ``out (B, Lq, H, Dv)`` in q's dtype and ``lse (B, H, Lq)`` (float32; float64
    for float64 inputs on CPU). The lse is the backward's: ALiBi's on ``cpu`` is relative to each query's nearest
    visible key (``encodings/alibi.py``). ``cos_coef``/``sin_coef`` ``(H, Dk, P)``, ``slopes`` ``(Bs, H)`` float32
    override the encoding's own values when not empty. ``window_left``/``window_right``: the sliding window's
    bounds (-1: unbounded), ``softcap``: the scores' soft cap (0.0: none), as ``Problem.window`` / ``softcap``."""
    return tuple(_launch_fwd(q, k, v, q_pos, k_pos, causal, window_left, window_right, softcap, scale,
                             _kernel_args(enc_id, q, k, cos_coef, sin_coef, slopes)))


@native_forward.register_fake
def _(q, k, v, q_pos, k_pos, cos_coef, sin_coef, slopes, enc_id, causal, window_left, window_right, softcap, scale):
    b, lq, h, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 and q.device.type == "cpu" else torch.float32
    return q.new_empty(b, lq, h, v.shape[3]), q.new_empty(b, h, lq, dtype=lse_dtype)


@torch.library.custom_op("fused_posenc::native_backward", mutates_args=())
def native_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, cos_coef: torch.Tensor,
                    sin_coef: torch.Tensor, slopes: torch.Tensor, enc_id: int, causal: bool, window_left: int,
                    window_right: int, softcap: float, scale: float, want_coef: bool,
                    want_slopes: bool) -> list[torch.Tensor]:
    """``fused_posenc._C.backward``: ``[dq, dk, dv, dcos_coef, dsin_coef, dslopes]``; the coefficient gradients
    ``(H, Dk, P)`` float32 only for FoPE with ``want_coef``, the slopes' ``(B, H)`` float32 only for ALiBi with
    ``want_slopes``, else empty tensors."""
    r = _launch_bwd(do, q, k, v, out, lse, q_pos, k_pos, causal, window_left, window_right, softcap, scale,
                    _kernel_args(enc_id, q, k, cos_coef, sin_coef, slopes), want_coef, want_slopes)
    return [q.new_empty(0, dtype=torch.float32) if x is None else x for x in r]  # (returns may not alias)


@native_backward.register_fake
def _(do, q, k, v, out, lse, q_pos, k_pos, cos_coef, sin_coef, slopes, enc_id, causal, window_left, window_right,
      softcap, scale, want_coef, want_slopes):
    coef = want_coef and cos_coef.numel() > 0
    dcoef = [q.new_empty(cos_coef.shape if coef else (0,), dtype=torch.float32) for _ in range(2)]
    slope = want_slopes and slopes.numel() > 0
    dslopes = q.new_empty((q.shape[0], q.shape[2]) if slope else (0,), dtype=torch.float32)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *dcoef, dslopes]


# --- autograd ------------------------------------------------------------------------------------------
class NativeAttention(torch.autograd.Function):
    """Inputs: q, k, v; FoPE's learnable coefficients expanded to ``(H, Dk, P)`` float32, ALiBi's learnable slopes
    ``(Bs, H)`` float32 (else empty tensors: the encoding's own values); positions ``(Bp, L)`` int64;
    the encoding, causal, the window ``(left, right)`` (-1: unbounded side; ``(-1, -1)``: none), the soft cap (0.0:
    none), the score scale, whether to return the lse too."""

    @staticmethod
    def forward(ctx, q, k, v, cos_coef, sin_coef, slopes, q_pos, k_pos, enc, causal, window, softcap, scale,
                return_lse):
        out, lse = native_forward(q, k, v, q_pos, k_pos, cos_coef, sin_coef, slopes, id(enc), causal, window[0],
                                  window[1], softcap, scale)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, cos_coef, sin_coef, slopes)
        ctx.enc = enc  # alive until the backward (a temporary ALiBi(slopes=t) would be gone by then)
        ctx.causal, ctx.window, ctx.softcap, ctx.scale = causal, window, softcap, scale
        if not return_lse:
            return out
        ctx.set_materialize_grads(False)
        public = lse.clone()
        # the cpu lse is relative to the nearest visible key (visible by the causal rule only: Plan::aref)
        if enc.name == "alibi" and q.device.type == "cpu":
            public = public - enc.lse_shift(q_pos, k_pos, causal, q.shape[2], q.shape[0]).to(public.dtype)
        return out, public

    @staticmethod
    @single_backward
    def backward(ctx, do, dlse=None):
        q, k, v, out, lse, q_pos, k_pos, cos_coef, sin_coef, slopes = ctx.saved_tensors
        want_coef = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        want_slopes = ctx.needs_input_grad[5]
        run = functools.partial(native_backward, q=q, k=k, lse=lse, q_pos=q_pos, k_pos=k_pos, cos_coef=cos_coef,
                                sin_coef=sin_coef, slopes=slopes, enc_id=id(ctx.enc), causal=ctx.causal,
                                window_left=ctx.window[0], window_right=ctx.window[1], softcap=ctx.softcap,
                                scale=ctx.scale, want_coef=want_coef, want_slopes=want_slopes)
        parts, dv = [], None
        if do is not None:
            parts.append(run(do=do.contiguous(), v=v, out=out))
            dv = parts[0][2]
        if dlse is not None:  # d(sum dlse * lse)/ds = P dlse: the backward of an output of ones (lse_grad_pass)
            parts.append(lse_grad_pass(run, q, v, dlse))
        dq, dk, _, dA, dB, dslopes = (x[0] if len(x) == 1 else x[0] + x[1] for x in zip(*parts))
        if dlse is not None and want_slopes and ctx.enc.name == "alibi" and q.device.type == "cpu":
            # the public lse is the cpu's (relative to the nearest visible key r) minus slope * r
            r = nearest_key_distance(q_pos, k_pos, ctx.causal).to(dslopes.dtype)  # (Bp, Lq)
            dslopes = dslopes - (dlse.to(dslopes.dtype) * r[:, None, :]).sum(-1)
        if not want_coef:
            dA = dB = None
        if want_slopes:  # (B, H) -> the slopes' (Bs, H)
            dslopes = dslopes.sum(0, keepdim=True) if slopes.shape[0] == 1 else dslopes
        else:
            dslopes = None
        return dq, dk, dv, dA, dB, dslopes, None, None, None, None, None, None, None, None


def lse_grad_pass(run, q, v, dlse, upstream_dtype=None):
    """The lse's share of the gradients, by the attention backward itself: with values ``v' = 1`` (one column)
    and an output ``o' = 0`` (so ``delta' = 0``), upstream ``dO' = dlse`` makes ``dP' = dlse`` and ``dS = P dlse``,
    the derivative of ``sum dlse * lse`` w.r.t. the scores; every gradient downstream of dS (rotations, FoPE
    coefficients, ALiBi slopes, TAPA) follows. ``run``: the backend's backward with everything else bound;
    ``upstream_dtype``: the dtype of ``dO'`` (default: the C++ backends' choice)."""
    b, lq, h, _ = q.shape
    # the C++ cpu kernels compute in float32 (float64): dlse unrounded; kernels that read dO in q's dtype get that
    dt = upstream_dtype or (torch.float64 if q.dtype == torch.float64 else
                            torch.float32 if q.device.type == "cpu" else q.dtype)
    d_o = dlse.transpose(1, 2)[..., None].to(dt).contiguous()  # (B, Lq, H, 1)
    ones = torch.ones(v.shape[0], v.shape[1], v.shape[2], 1, device=v.device, dtype=v.dtype)
    zeros = torch.zeros(b, lq, h, 1, device=q.device, dtype=d_o.dtype)
    return run(do=d_o, v=ones, out=zeros)


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
    scale = float(enc.score_scale(d, p.softmax_scale))
    cos_coef, sin_coef, slopes = (torch.empty(0, device=dev) for _ in range(3))  # three: apply takes no duplicates
    if enc.name == "fope" and getattr(enc, "learnable", False) and torch.is_grad_enabled():
        a, bb = enc.coef_per_query_head(h, hkv)  # differentiable (H, Dk, Dout)
        pad = torch.zeros(h, a.shape[1], d // 2 - a.shape[2], device=dev, dtype=torch.float32)
        cos_coef = torch.cat([a.to(device=dev, dtype=torch.float32), pad], -1)
        sin_coef = torch.cat([bb.to(device=dev, dtype=torch.float32), pad], -1)
    if learnable_slopes(p):  # (Bs, H): the live, differentiable slopes
        slopes = enc.slopes(h, b, dev)
    q_pos, k_pos = p.q_pos.contiguous(), p.k_pos.contiguous()
    if k_pos is q_pos:  # one tensor for both (self-attention): torch.compile traces no duplicate Function inputs
        k_pos = k_pos.clone()
    window = (-1, -1) if p.window is None else (int(p.window[0]), int(p.window[1]))
    softcap = 0.0 if p.softcap is None else float(p.softcap)
    return NativeAttention.apply(p.q, p.k, p.v, cos_coef, sin_coef, slopes, q_pos, k_pos, enc, p.causal, window,
                                 softcap, scale, p.return_lse)
