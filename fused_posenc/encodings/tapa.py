"""TAPA: token-aware phase attention (Wang et al., 2025, arXiv 2509.12635).

No rotation. Each head splits into amplitude dims ``[0, Da)`` and phase dims ``[Da, D)``:

    score(m, n) = amp * cos(psi),   amp = s_user * (q_A . k_A) / sqrt(Da),
    psi = c * |m - n|^alpha * (q_P . k_P) / sqrt(Dp)

with ``Da = clamp(int(theta_split * D), 1, D-1)``, ``c = phase_scale`` (paper: 2 pi, authors'
code: 1), ``s_user`` the caller's ``softmax_scale`` (1 when not given). ``|0|^alpha = 0``.

Gradients (``dS`` from the softmax backward, ``Omega = c |m-n|^alpha / sqrt(Dp)``):
``d amp = dS cos(psi)``, ``d(q_P.k_P) = -dS amp sin(psi) Omega``; then the usual matmuls.
"""
from __future__ import annotations

import math

import torch

from .base import Encoding, KernelParams, check_positive, soft_cap


class TAPA(Encoding):
    """Token-aware phase attention (``"tapa"``).

    Args:
        theta_split: fraction of the head used for the amplitude, ``Da = clamp(int(theta_split*D), 1, D-1)``.
        alpha: distance exponent.
        phase_scale: ``c`` in the phase ``c * |m-n|^alpha * q_P.k_P / sqrt(Dp)``.
    """

    name = "tapa"

    def __init__(self, theta_split: float = 0.5, alpha: float = 0.1, phase_scale: float = 2 * math.pi):
        self.theta_split = check_positive("theta_split", theta_split)
        if self.theta_split >= 1:
            raise ValueError(f"theta_split must be in (0, 1), got {theta_split}")
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        if isinstance(phase_scale, bool) or not isinstance(phase_scale, (int, float)) or not math.isfinite(phase_scale):
            raise ValueError(f"phase_scale must be a finite number, got {phase_scale!r}")
        self.phase_scale = float(phase_scale)

    def split(self, head_dim: int) -> int:
        return min(max(int(self.theta_split * head_dim), 1), head_dim - 1)

    def validate(self, head_dim, nheads, nheads_kv, batch):
        if head_dim < 2:
            raise ValueError(f"tapa needs headdim >= 2 (amplitude and phase dims), got headdim={head_dim}")

    def score_scale(self, head_dim, softmax_scale):
        return (1.0 if softmax_scale is None else float(softmax_scale)) / math.sqrt(self.split(head_dim))

    def phase_factor(self, head_dim: int) -> float:
        """``c / sqrt(Dp)``."""
        return self.phase_scale / math.sqrt(head_dim - self.split(head_dim))

    def scores(self, q, k, q_pos, k_pos, softmax_scale, causal=False, softcap=None):
        da, amp_scale, phase = self.split(q.shape[-1]), self.score_scale(q.shape[-1], softmax_scale), self.phase_factor(q.shape[-1])
        amp = torch.einsum("bmhd,bnhd->bhmn", q[..., :da], k[..., :da]) * amp_scale
        # phase in float32 or better: |psi| reaches hundreds, so even q_P . k_P is formed in float32
        # (a bf16/fp16 rounded dot would be off by whole radians); the kernels accumulate it in float32 too
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        dot = torch.einsum("bmhd,bnhd->bhmn", q[..., da:].to(wd), k[..., da:].to(wd))
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(wd)  # (Bp, Lq, Lk)
        # |0|^alpha = 0 for every alpha (the spec's rule; torch's 0**0 would give 1 when alpha = 0)
        dist = torch.where(dist > 0, dist ** self.alpha, torch.zeros_like(dist))
        psi = phase * dist[:, None] * dot
        s = (amp.to(wd) * torch.cos(psi)).to(q.dtype)
        return s if softcap is None else soft_cap(s, softcap)  # the whole score, modulation included, is capped

    def kernel_params(self, head_dim, nheads, nheads_kv, batch, device) -> KernelParams:
        return KernelParams(kind="tapa", tapa_split=self.split(head_dim), tapa_alpha=self.alpha,
                            tapa_phase_scale=self.phase_factor(head_dim))

    def __repr__(self):
        return f"TAPA(theta_split={self.theta_split}, alpha={self.alpha}, phase_scale={self.phase_scale})"
