"""Turn a validated call into what the Triton kernels take: parts, tables, flags, block sizes.

Computed once per call on the host (no device synchronisation): the two head-dim parts, the
encoding tensors of :class:`KernelParams`, and the constexpr flags that select the hooks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ...encodings.base import KernelParams

ENC_CODES = {"none": 0, "rotary": 1, "fope": 2, "alibi": 3, "tapa": 4}


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@dataclass
class Plan:
    enc: int
    p1: int  # size of part 1
    p2: int  # size of part 2
    gather: bool  # parts are index maps, not contiguous ranges
    idx1: torch.Tensor
    idx2: torch.Tensor
    freq: torch.Tensor
    fscale: torch.Tensor
    fw: torch.Tensor
    fa: torch.Tensor
    fb: torch.Tensor
    fpad: torch.Tensor
    nf: int
    slopes: torch.Tensor
    slope_stride_b: int
    scale: float  # multiplies the (first) dot: softmax scale, or TAPA's amplitude scale
    phase: float
    alpha: float
    rotation: bool
    k_heads_rot: int  # heads of the pre-rotated k (nheads_kv, or nheads for per-query-head FoPE)
    fope_learnable: bool

    @property
    def block_p1(self) -> int:
        return pow2(self.p1)

    @property
    def block_p2(self) -> int:
        return pow2(self.p2)

    @property
    def block_f(self) -> int:
        return pow2(self.nf)


def _none_split(d: int) -> int:
    """Split a head for the dot-only encodings so that neither part wastes padding when it can."""
    if d <= 16:
        return d // 2 if d > 1 else 1
    return 1 << ((d - 1).bit_length() - 1)


def make_plan(kp: KernelParams, head_dim: int, nheads: int, nheads_kv: int, scale: float,
              device: torch.device, fope_coefs: Optional[tuple] = None, fope_heads: int = 1) -> Plan:
    """``fope_coefs``: optional differentiable ``(A, B)`` of shape ``(H, NF, P)`` replacing kp's detached ones;
    ``fope_heads``: the FoPE's coefficient head count ``Hc``."""
    d = head_dim
    dummy_f = torch.zeros(1, device=device, dtype=torch.float32)
    dummy_i = torch.zeros(1, device=device, dtype=torch.int32)
    enc = ENC_CODES[kp.kind]
    rotation = kp.kind in ("rotary", "fope")
    plan = Plan(enc=enc, p1=0, p2=0, gather=False, idx1=dummy_i, idx2=dummy_i, freq=dummy_f, fscale=dummy_f,
                fw=dummy_f, fa=dummy_f, fb=dummy_f, fpad=dummy_f, nf=1, slopes=dummy_f, slope_stride_b=0,
                scale=scale, phase=0.0, alpha=0.0, rotation=rotation, k_heads_rot=nheads_kv,
                fope_learnable=kp.fope_learnable)
    if rotation:
        plan.p1 = plan.p2 = d // 2
        plan.gather = not kp.contiguous
        plan.idx1 = kp.idx1.to(device=device, dtype=torch.int32).contiguous()
        plan.idx2 = kp.idx2.to(device=device, dtype=torch.int32).contiguous()
        if kp.kind == "rotary":
            plan.freq = kp.pair_freqs.to(device=device, dtype=torch.float32).contiguous()
            plan.fscale = kp.pair_scale.to(device=device, dtype=torch.float32).contiguous()
        else:
            plan.fw = kp.fope_freqs.to(device=device, dtype=torch.float32).contiguous()
            a, b = fope_coefs if fope_coefs is not None else (kp.fope_cos_coef, kp.fope_sin_coef)
            plan.fa = a.to(device=device, dtype=torch.float32).contiguous()
            plan.fb = b.to(device=device, dtype=torch.float32).contiguous()
            plan.fpad = kp.fope_pad.to(device=device, dtype=torch.float32).contiguous()
            plan.nf = kp.fope_freqs.numel()
            # keys need their own copy per query head only when the coefficients differ inside a group
            per_head = fope_heads == nheads and nheads != nheads_kv
            plan.k_heads_rot = nheads if per_head else nheads_kv
    elif kp.kind == "tapa":
        plan.p1, plan.p2 = kp.tapa_split, d - kp.tapa_split
        plan.phase, plan.alpha = kp.tapa_phase_scale, kp.tapa_alpha
    else:
        plan.p1 = _none_split(d)
        plan.p2 = d - plan.p1
        if kp.kind == "alibi":
            plan.slopes = kp.slopes.to(device=device, dtype=torch.float32).contiguous()
            plan.slope_stride_b = plan.slopes.shape[1] if plan.slopes.shape[0] > 1 else 0
    return plan
