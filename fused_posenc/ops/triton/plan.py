"""Turn a validated call into what the Triton kernels take: parts, encoding tensors, flags.

Built once per (encoding, shape, device) and cached: every tensor here lives on the device, so a
call issues no host-to-device copy (a pageable copy would synchronise the stream).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from ...encodings.base import KernelParams

ENC_CODES = {"none": 0, "rotary": 1, "fope": 2, "alibi": 3, "tapa": 4}


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launcher(kernel):
    """``kernel`` as a launcher calls it (``launcher(kernel)[grid](...)``): through ``torch.library.wrap_triton``, so
    that torch.compile traces the launch into its graph as a ``triton_kernel_wrapper`` node, which Inductor compiles
    and schedules itself (an eager call of the op runs the kernel directly: ``triton_op`` turns the wrapper off).
    Under the interpreter the kernels are not compiled Triton functions and run eagerly only; a stand-in object (the
    static report's recorder, ``scripts/triton_aot.py``) is called as it is."""
    if interpreter() or not isinstance(kernel, (triton.runtime.JITFunction, triton.runtime.Autotuner,
                                                triton.runtime.Heuristics)):
        return kernel
    return torch.library.wrap_triton(kernel)


def traced(t: torch.Tensor) -> bool:
    """Whether ``t`` stands in for data while torch.compile traces a call (a fake or functional tensor): a launcher
    must then build its constants into the graph and keep nothing it made in a cache (``autograd.py``)."""
    return isinstance(t, (FakeTensor, FunctionalTensor))


def pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@dataclass
class Plan:
    enc: int  # one of ENC_CODES' values (the kernels' ENC constexpr)
    p1: int  # size of part 1 of a head
    p2: int  # size of part 2
    gather: bool  # parts are index maps, not the ranges [0, p1) and [p1, p1 + p2)
    idx1: torch.Tensor  # (p1,) int32 head-dim indices (used when gather)
    idx2: torch.Tensor
    turns: torch.Tensor  # (P,) int64 RoPE/HoPE frequency per pair as a 64-bit turn fraction (encodings/angles.py)
    fscale: torch.Tensor  # (P,) float32 cos/sin multiplier per pair (YaRN)
    slopes: torch.Tensor  # (Bs, H) float32 ALiBi slopes
    slope_stride_b: int
    scale: float  # multiplies the (first) dot: softmax scale, or TAPA's amplitude scale
    phase: float  # TAPA: c / sqrt(Dp)
    alpha: float  # TAPA: distance exponent
    rotation: bool
    k_heads_rot: int = 1  # heads of the pre-rotated keys (nheads_kv, or nheads for per-query-head FoPE)
    fope_learnable: bool = False
    tables: dict = field(default_factory=dict)  # RoPE/HoPE tables of default positions, by (first position, rows)

    @property
    def block_p1(self) -> int:
        return pow2(self.p1)

    @property
    def block_p2(self) -> int:
        return pow2(self.p2)

    @property
    def one_dot(self) -> bool:
        """Part 1 is the whole head (NoPE/ALiBi at a power-of-two head dim): one QK product per tile, no part 2."""
        return self.p2 == 0


def _none_split(d: int) -> int:
    """Part 1 of a head for the dot-only encodings: the whole head when its width is a power of two (>= 16: one
    tensor-core product, no part 2), else a split that wastes no padding when it can."""
    if d >= 16 and d & (d - 1) == 0:
        return d
    if d <= 16:
        return max(d // 2, 1)
    return 1 << ((d - 1).bit_length() - 1)


def make_plan(kp: KernelParams, head_dim: int, nheads: int, nheads_kv: int, scale: float,
              device: torch.device, fope_heads: int = 1) -> Plan:
    """``fope_heads``: the FoPE's coefficient head count ``Hc`` (keys are rotated per query head only
    when ``Hc == nheads`` inside GQA groups)."""
    d = head_dim
    dummy_f = torch.zeros(1, device=device, dtype=torch.float32)
    dummy_i = torch.zeros(1, device=device, dtype=torch.int32)
    rotation = kp.kind in ("rotary", "fope")
    dummy_l = torch.zeros(1, device=device, dtype=torch.int64)
    plan = Plan(enc=ENC_CODES[kp.kind], p1=0, p2=0, gather=False, idx1=dummy_i, idx2=dummy_i, turns=dummy_l,
                fscale=dummy_f, slopes=dummy_f, slope_stride_b=0, scale=scale, phase=0.0, alpha=0.0,
                rotation=rotation, k_heads_rot=nheads_kv, fope_learnable=kp.fope_learnable)
    if rotation:
        plan.p1 = plan.p2 = d // 2
        plan.gather = not kp.contiguous
        plan.idx1 = kp.idx1.to(device=device, dtype=torch.int32).contiguous()
        plan.idx2 = kp.idx2.to(device=device, dtype=torch.int32).contiguous()
        if kp.kind == "rotary":
            plan.turns = kp.pair_turns64.to(device=device, dtype=torch.int64).contiguous()
            plan.fscale = kp.pair_scale.to(device=device, dtype=torch.float32).contiguous()
        elif fope_heads == nheads and nheads != nheads_kv:
            plan.k_heads_rot = nheads
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

