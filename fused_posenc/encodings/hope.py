"""HoPE: RoPE whose low-frequency pairs are not rotated (Chen et al., 2024, arXiv 2410.21216).

Pair ``i`` keeps its frequency ``theta_i = base^(-2i/D)`` iff it completes at least ``min_cycles``
turns inside the training length: ``theta_i * train_len / (2 pi) >= min_cycles``. Every other pair
gets ``theta_i = 0``: cos = 1, sin = 0, a position-independent content channel. With D=128,
base=1e4, train_len=4096 the kept pairs are ``i <= 45`` (46 of 64), since
``i <= 64 * ln(train_len / (2 pi)) / ln(base) = 45.03``.
"""
from __future__ import annotations

import math

import torch

from .base import check_positive
from .rope import RoPE


class HoPE(RoPE):
    """High-frequency rotary position encoding (``"hope"``); half layout over the whole head.

    Args:
        base: RoPE base.
        train_len: training length ``L`` (fixed at training time).
        min_cycles: keep pair ``i`` iff ``theta_i * L / (2 pi) >= min_cycles``.
    """

    name = "hope"

    def __init__(self, base: float = 10000.0, train_len: int = 4096, min_cycles: float = 1.0):
        super().__init__(base=base)
        if isinstance(train_len, bool) or not isinstance(train_len, int) or train_len <= 0:
            raise ValueError(f"train_len must be a positive int, got {train_len!r}")
        self.train_len = train_len
        self.min_cycles = check_positive("min_cycles", min_cycles, allow_zero=True)

    def kept(self, head_dim: int) -> torch.Tensor:
        """Boolean ``(headdim/2,)``: which pairs keep their rotation."""
        i = torch.arange(head_dim // 2, dtype=torch.float64)
        theta = self.base ** (-2.0 * i / head_dim)
        return theta * self.train_len / (2 * math.pi) >= self.min_cycles

    def frequencies(self, head_dim):
        theta, att = super().frequencies(head_dim)
        return torch.where(self.kept(head_dim), theta, torch.zeros_like(theta)), att

    def __repr__(self):
        return f"HoPE(base={self.base}, train_len={self.train_len}, min_cycles={self.min_cycles})"
